-- Derived (cached function) entries. KEYS: gen, data, then one write counter per dependency.
-- ARGV: fresh gen. A value is "D|gen|w1,w2,...|<mac+payload>", valid while every
-- dependency's counter is unchanged; "T|token" is a tombstone left by fn.invalidate().
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
return {0, g, wstr, ''}
