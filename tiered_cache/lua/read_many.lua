-- KEYS: gen, writes, then data keys. ARGV: lease ms, fresh gen, row-version key prefix,
-- then one lease token per data key ('' = none). Returns {gen, writes, r1, r2, ...}: each
-- r is the value of a valid hit, or 2 (lease granted) or 3 (no lease) for a miss.
-- Lease keys are the data keys plus '|L', in the same hash slot.
local g = generation(KEYS[1], ARGV[2])
local w = generation(KEYS[2], ARGV[2] .. ':w')
local out = {g, w}
for i = 3, #KEYS do
  local v = sget(KEYS[i])
  if v and valid(v, g, w, ARGV[3]) then
    out[#out + 1] = v
  else
    local tok = ARGV[i + 1]
    if tok ~= '' and (redis.call('SET', KEYS[i] .. '|L', tok, 'NX', 'PX', ARGV[1])
        or (redis.call('PTTL', KEYS[i] .. '|L') == -1
            and redis.call('SET', KEYS[i] .. '|L', tok, 'PX', ARGV[1]))) then
      out[#out + 1] = 2
    else
      out[#out + 1] = 3
    end
  end
end
return out
