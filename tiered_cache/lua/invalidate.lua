-- KEYS: gen, writes, then row-version keys (ARGV[3] of them).
-- ARGV: channel, message, number of row keys, fresh token, row version ttl ms,
-- flush '1'/'0', fresh gen. New row versions make every entry of those rows invalid,
-- under whatever lookup it was stored, without knowing the old lookup values.
-- A write counter that cannot be incremented (junk in it, or INCR refused when Redis is
-- out of memory) is replaced by a fresh token, never reset to a value it held before: a
-- fill that saw the old value would then pass although the model was written (ABA).
local w = redis.pcall('INCR', KEYS[2])
if type(w) == 'table' and w.err then
  redis.call('DEL', KEYS[2]); redis.call('SET', KEYS[2], ARGV[4] .. ':w')
end
local n = tonumber(ARGV[3])
for i = 3, 2 + n do redis.call('SET', KEYS[i], ARGV[4] .. ':' .. i, 'PX', ARGV[5]) end
if ARGV[6] == '1' then redis.call('SET', KEYS[1], ARGV[7]) end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
