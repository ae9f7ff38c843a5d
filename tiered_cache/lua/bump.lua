-- KEYS: counters to bump (derived functions' mirrors of model write counts).
-- ARGV: a fresh token, for a counter that cannot be incremented (as in INVALIDATE).
for i = 1, #KEYS do
  local w = redis.pcall('INCR', KEYS[i])
  if type(w) == 'table' and w.err then
    redis.call('DEL', KEYS[i])
    if ARGV[1] then redis.call('SET', KEYS[i], ARGV[1] .. ':' .. i)
    else redis.call('INCR', KEYS[i]) end
  end
end
return 1
