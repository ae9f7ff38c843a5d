-- KEYS as DREAD. ARGV: gen seen, counters seen, marker seen (DREAD's), value (the
-- "D|gen|counters|expiry|" header, MAC and body, signed by the caller), ttl ms.
if sget(KEYS[1]) ~= ARGV[1] then return 0 end
local ws = {}
-- A counter gone since the read (restart, eviction) refuses the fill.
for i = 3, #KEYS do ws[#ws + 1] = sget(KEYS[i]) or '' end
if table.concat(ws, ',') ~= ARGV[2] then return 0 end
-- Replaced (invalidate(), another fill) or gone (eviction) since the read: refused.
if sget(KEYS[2]) ~= ARGV[3] then return 0 end
redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5])
return 1
