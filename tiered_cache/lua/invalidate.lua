-- KEYS: gen, writes, then row-version keys (ARGV[3] of them).
-- ARGV: channel ('' = publish nothing: the caller publishes after every script of the
-- batch ran), message, number of row keys, fresh token, row version ttl ms, flush '1'/'0',
-- fresh gen. New row versions make every entry of those rows invalid, under whatever
-- lookup it was stored, without knowing the old lookup values.
-- The write counter gets a fresh token, never an incremented value: after a restart, an
-- eviction or a failover lost it, INCR would start again from 1 and could give a value a
-- reader already saw (ABA), letting its fill of the old row pass.
redis.call('SET', KEYS[2], ARGV[4] .. ':w')
local n = tonumber(ARGV[3])
for i = 3, 2 + n do redis.call('SET', KEYS[i], ARGV[4] .. ':' .. i, 'PX', ARGV[5]) end
if ARGV[6] == '1' then redis.call('SET', KEYS[1], ARGV[7]) end
if ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return 1
