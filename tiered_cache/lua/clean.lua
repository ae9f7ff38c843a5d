-- KEYS: gen, writes, an index of the group (one model, one generation), the group's set of
-- indexes, then entries of that index. ARGV: row-version key prefix, now (ms since the epoch).
-- Deletes every entry a read would not serve (valid() is the test READ applies): another
-- generation, a negative older than the model's last write, a row whose version moved,
-- anything unparsable; forgets in the index the entries deleted or gone, and the expired
-- ones; drops the index once empty. Returns {old generation, stale, members left}.
local g = sget(KEYS[1])
-- A missing write counter: no "no such row" entry is valid any more (see common.lua).
local w = sget(KEYS[2]) or ''
local old, stale = 0, 0
for i = 5, #KEYS do
  local v = redis.pcall('GET', KEYS[i])
  local gone = false
  if type(v) == 'table' and v.err then
    redis.call('DEL', KEYS[i]); stale = stale + 1; gone = true
  elseif not v then
    gone = true
  else
    local kind, vg = header(v)
    if kind and vg ~= g then
      redis.call('DEL', KEYS[i]); old = old + 1; gone = true
    elseif not valid(v, g, w, ARGV[1]) then
      redis.call('DEL', KEYS[i]); stale = stale + 1; gone = true
    end
  end
  if gone then redis.pcall('ZREM', KEYS[3], KEYS[i]) end
end
redis.pcall('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[2])
local left = redis.pcall('ZCARD', KEYS[3])
if type(left) ~= 'number' then left = 0 end
if left == 0 then
  redis.call('DEL', KEYS[3]); redis.pcall('SREM', KEYS[4], KEYS[3])
end
return {old, stale, left}
