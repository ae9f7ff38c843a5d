-- KEYS: a model's trend list. ARGV: the minute (since the epoch) of this push, elements
-- kept, ttl ms, then the push's reads in keys.TREND_FIELDS order (L1, L2, remembered
-- absence, database, bypassed). An element is "minute l1 l2 negative misses bypassed": the
-- reads of one minute, every process summed. A push adds its reads to the last element
-- when that is its minute (or a later one: this process's clock is behind), else appends
-- one; the list keeps the last ARGV[2] minutes that had reads. Junk under the key (another
-- type, or an element of another shape) is replaced: it must never fail a push.
if redis.call('TYPE', KEYS[1]).ok ~= 'list' then redis.call('DEL', KEYS[1]) end
local minute = tonumber(ARGV[1])
local counts = {}
for i = 4, #ARGV do counts[#counts + 1] = tonumber(ARGV[i]) end
local function render(m)
  local out = {string.format('%d', m)}
  for i = 1, #counts do out[#out + 1] = string.format('%d', counts[i]) end
  return table.concat(out, ' ')
end
local last = redis.call('LINDEX', KEYS[1], -1)
local added = 1
if last then
  local parts, n = {}, 0
  for p in string.gmatch(last, '%S+') do n = n + 1; parts[n] = tonumber(p) or false end
  local shaped = n == #counts + 1
  for i = 1, n do shaped = shaped and parts[i] ~= false end
  if shaped and parts[1] >= minute then
    for i = 1, #counts do counts[i] = counts[i] + parts[i + 1] end
    redis.call('LSET', KEYS[1], -1, render(parts[1]))
    added = 0
  elseif not shaped then
    redis.call('RPOP', KEYS[1])
  end
end
if added == 1 then
  redis.call('RPUSH', KEYS[1], render(minute))
  redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return added
