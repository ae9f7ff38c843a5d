-- KEYS: counters to move on (derived functions' mirrors of model write counters).
-- ARGV: a fresh token. Each counter gets a value it never held (see invalidate.lua).
for i = 1, #KEYS do redis.call('SET', KEYS[i], ARGV[1] .. ':' .. i) end
return 1
