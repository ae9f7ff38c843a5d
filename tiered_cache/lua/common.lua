-- Reads a key as a string; a key of another type (someone's junk) is deleted and a miss.
-- A generation must be a token ([%w:_-]): junk there (a '|' would make every value of the
-- model unparsable, a miss forever) is replaced by a fresh one, i.e. the model is flushed.
-- A lease key without an expiry is not a lease (junk, or a lost PX): it is taken over, or
-- every reader of that key would wait LEASE_WAIT for a fill that never comes.
local function sget(k)
  local v = redis.pcall('GET', k)
  if type(v) == 'table' and v.err then redis.call('DEL', k) return false end
  return v
end
-- A generation, write counter or derived counter, made anew (a fresh token, never a value
-- it held before) when missing or junk. Missing is what a restart, FLUSHALL, eviction or a
-- failover to a replica that never got it leaves: a counter that restarted from a fixed
-- value (0) would make an old "no such row" entry, or a fill begun before a write, valid
-- again.
local function generation(k, fresh)
  local g = sget(k)
  if not g or string.find(g, '[^%w:_-]') then g = fresh; redis.call('SET', k, g) end
  return g
end
