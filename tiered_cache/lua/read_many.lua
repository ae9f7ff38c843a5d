-- KEYS: gen, writes, then data keys. ARGV: lease ms, fresh gen, row-version key prefix,
-- then one lease token per data key ('' = none), then one row id per data key (the pk's).
-- Returns {gen, writes, r1, r2, ...}: each r is the value of a valid hit, or for a miss
-- {2 (lease granted) or 3 (no lease), the row's version or false} (see read.lua).
-- Lease keys are the data keys plus '|L', in the same hash slot.
local g = generation(KEYS[1], ARGV[2])
local w = generation(KEYS[2], ARGV[2] .. ':w')
local out = {g, w}
local n = #KEYS - 2
for i = 3, #KEYS do
  local v = sget(KEYS[i])
  if v and valid(v, g, w, ARGV[3]) then
    out[#out + 1] = v
  else
    local rid = ARGV[i + 1 + n]
    local tok = ARGV[i + 1]
    local rv = false
    if tok ~= '' and rid and rid ~= '' then  -- as in read.lua
      local rk = ARGV[3] .. rid
      rv = sget(rk)
      if not rv or string.find(rv, '[^%w:_-]') then
        rv = ARGV[2] .. ':v' .. i
        redis.call('SET', rk, rv, 'PX', ARGV[1])
      end
    end
    if tok ~= '' and (redis.call('SET', KEYS[i] .. '|L', tok, 'NX', 'PX', ARGV[1])
        or (redis.call('PTTL', KEYS[i] .. '|L') == -1
            and redis.call('SET', KEYS[i] .. '|L', tok, 'PX', ARGV[1]))) then
      out[#out + 1] = {2, rv}
    else
      out[#out + 1] = {3, rv}
    end
  end
end
return out
