-- KEYS: gen, writes, then row-version keys (ARGV[3] of them), then the shard's write log.
-- ARGV: channel ('' = publish nothing: the caller publishes after every script of the
-- batch ran), message, number of row keys, fresh token, row version ttl ms, flush '1'/'0',
-- fresh gen. New row versions make every entry of those rows invalid, under whatever
-- lookup it was stored, without knowing the old lookup values.
-- The write counter gets a fresh token, never an incremented value: after a restart, an
-- eviction or a failover lost it, INCR would start again from 1 and could give a value a
-- reader already saw (ABA), letting its fill of the old row pass.
local before = sget(KEYS[2])
redis.call('SET', KEYS[2], ARGV[4] .. ':w')
local n = tonumber(ARGV[3])
for i = 3, 2 + n do redis.call('SET', KEYS[i], ARGV[4] .. ':' .. i, 'PX', ARGV[5]) end
if ARGV[6] == '1' then redis.call('SET', KEYS[1], ARGV[7]) end
-- The log (fill.lua's unchanged_row): this write's row keys, then its marker at the head:
-- "\1" for a write of these rows or "\2" for one of the whole model, the token, "|" and
-- the write count it replaced, so that a reader of the log sees every change of the count
-- chained (a change made by a script that logs nothing, from an older release, breaks the
-- chain). Junk there must not cost the write, hence pcall; a lost, short or broken log
-- only refuses fills. A write of many rows is logged as one of the whole model: the log
-- keeps 512 items, and unpack() takes a bounded number of values.
local log = KEYS[3 + n]
local whole = n == 0 or n > 256 or ARGV[6] == '1'
local rows = {}
if not whole then
  for i = 3, 2 + n do rows[#rows + 1] = KEYS[i] end
end
rows[#rows + 1] = (whole and '\2' or '\1') .. ARGV[4] .. '|' .. (before or '')
redis.pcall('LPUSH', log, unpack(rows))
redis.pcall('LTRIM', log, 0, 511)
redis.pcall('PEXPIRE', log, ARGV[5])
if ARGV[1] ~= '' then redis.call('PUBLISH', ARGV[1], ARGV[2]) end
return 1
