-- Derived (cached function) entries. KEYS: gen, data, then one write counter per dependency.
-- ARGV: fresh gen, marker ttl ms. A value is "D|gen|w1,w2,...|<mac+payload>", valid while
-- every dependency's counter is unchanged; "T|token" is a marker: left by fn.invalidate()
-- (a tombstone), or by a read that found no valid value. A fill must find the very marker
-- its read saw: one invalidate() replaced, or that is gone (evicted, Redis restarted
-- empty), refuses it, as a row's fill is refused when its version key is gone.
local g = generation(KEYS[1], ARGV[1])
local ws = {}
for i = 3, #KEYS do ws[#ws + 1] = generation(KEYS[i], ARGV[1] .. ':' .. i) end
local wstr = table.concat(ws, ',')
local v = sget(KEYS[2])
if v then
  local kind, vg, vw = string.match(v, '^(%u)|([^|]*)|([^|]*)|')
  if kind == 'D' and vg == g and vw == wstr then return {1, v} end
  if string.sub(v, 1, 2) == 'T|' then return {0, g, wstr, v} end
end
local marker = 'T|' .. ARGV[1] .. ':r'
redis.call('SET', KEYS[2], marker, 'PX', ARGV[2])
return {0, g, wstr, marker}
