-- KEYS: gen, writes, data, lease. ARGV: lease token ('' = none), lease ms, fresh gen,
-- row-version key prefix, the row id of the key's row when the key names it (a pk
-- lookup; '' otherwise). Returns {1, value} on a valid hit, else {code, gen, writes,
-- row version} where code is 0 (no lease asked), 2 (lease granted) or 3 (someone else
-- fills), and the row version is the row's when a lease was asked and the row id is
-- known (false otherwise): a fill of that row is then refused only if that row was written
-- since, not if any row of the model was.
-- A value is "P|gen|row|rowver|<mac+payload>" or "N|gen|writes||<mac+payload>": a row is
-- valid while its row version stands, a "no such row" while the model saw no write.
local g = generation(KEYS[1], ARGV[3])
local w = generation(KEYS[2], ARGV[3] .. ':w')
local v = sget(KEYS[3])
if v and valid(v, g, w, ARGV[4]) then return {1, v} end
if ARGV[1] == '' then return {0, g, w, false} end
-- A lease means a fill will follow: it is guarded by the row's version, made here (a
-- fresh token, as generation() makes counters) if the row has none yet, so that even the
-- first fill of a row is refused only by a write of that row.
local rv = false
if ARGV[5] ~= '' then
  local rk = ARGV[4] .. ARGV[5]
  rv = sget(rk)
  if not rv or string.find(rv, '[^%w:_-]') then
    rv = ARGV[3] .. ':v'
    redis.call('SET', rk, rv, 'PX', ARGV[2])
  end
end
if redis.call('SET', KEYS[4], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, g, w, rv} end
if redis.call('PTTL', KEYS[4]) == -1 then
  redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[2])
  return {2, g, w, rv}
end
return {3, g, w, rv}
