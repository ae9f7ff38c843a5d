-- KEYS: gen, writes, then data keys. ARGV[1]: row-version key prefix.
-- Deletes every entry a read would not serve (valid() is the test READ applies): another
-- generation, a negative older than the model's last write, a row whose version moved,
-- anything unparsable. Returns {old generation, stale}.
local g = sget(KEYS[1])
local w = sget(KEYS[2]) or '0'
local old, stale = 0, 0
for i = 3, #KEYS do
  local v = redis.pcall('GET', KEYS[i])
  if type(v) == 'table' and v.err then
    redis.call('DEL', KEYS[i]); stale = stale + 1
  elseif v then
    local kind, vg = header(v)
    if kind and vg ~= g then
      redis.call('DEL', KEYS[i]); old = old + 1
    elseif not valid(v, g, w, ARGV[1]) then
      redis.call('DEL', KEYS[i]); stale = stale + 1
    end
  end
end
return {old, stale}
