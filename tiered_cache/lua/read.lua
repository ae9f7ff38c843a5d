-- KEYS: gen, writes, data, lease. ARGV: lease token ('' = none), lease ms, fresh gen,
-- row-version key prefix. Returns {1, value} on a valid hit, else {code, gen, writes}
-- where code is 0 (no lease asked), 2 (lease granted) or 3 (someone else fills).
-- A value is "P|gen|row|rowver|<mac+payload>" or "N|gen|writes||<mac+payload>": a row is
-- valid while its row version stands, a "no such row" while the model saw no write.
local g = generation(KEYS[1], ARGV[3])
local w = generation(KEYS[2], ARGV[3] .. ':w')
local v = sget(KEYS[3])
if v and valid(v, g, w, ARGV[4]) then return {1, v} end
if ARGV[1] == '' then return {0, g, w} end
if redis.call('SET', KEYS[4], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, g, w} end
if redis.call('PTTL', KEYS[4]) == -1 then
  redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[2])
  return {2, g, w}
end
return {3, g, w}
