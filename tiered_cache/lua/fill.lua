-- KEYS: gen, guard (the model's write counter; for a row whose version the reader saw,
-- that row's version key), data, lease, row-version key (positive fills), the model's
-- index of this generation, the group's set of indexes, the shard's write log.
-- ARGV: lease token ('' = none), gen seen, guard seen, kind 'P'/'N', value (header, MAC
-- and body, signed by the filler), ttl ms, row version in the value's header, row version
-- ttl ms, expiry (ms since the epoch), '1' if a changed write counter may be forgiven by
-- the log. Returns 1 (stored), 0 (refused) or {2, current row version}: the row already
-- has a version other than the one signed, and the filler signs again with it.
-- Refused if the model was flushed, or written (the row, when the guard is its version)
-- since the reader's first look: that is what keeps a row read before a commit from being
-- stored after its invalidation, which gives the row and the model fresh tokens. A refused
-- filler still gives its lease back, or every other reader of the key would wait
-- LEASE_WAIT for a fill that never comes, until the lease expires.

-- Whether the log (invalidate.lua) shows that none of the writes that took the write
-- count from `seen` to `now` touched `row` or the whole model. Newest first, a marker
-- ("\1" or "\2", the token, "|", the count it replaced) heads its write's row keys; the
-- markers must chain from `now` back to `seen`, or some change of the count is not in the
-- log (a lost, short or junk log, a count made anew, a write by an older release): no.
-- Read in pages, since most fills find `seen` a few writes back.
local function unchanged_row(log, seen, now, row)
  local count = now
  local first = 0
  while true do
    local items = redis.pcall('LRANGE', log, first, first + 63)
    if type(items) ~= 'table' or items.err then return false end
    if #items == 0 then return count == seen end
    for _, item in ipairs(items) do
      local c = item:byte(1)
      if c == 1 or c == 2 then
        if count == seen then return true end
        local bar = string.find(item, '|', 2, true)
        if not bar or item:sub(2, bar - 1) .. ':w' ~= count or c == 2 then return false end
        count = item:sub(bar + 1)
      elseif item == row then
        return false
      end
    end
    first = first + 64
  end
end

local count = sget(KEYS[2])
local moved = count ~= ARGV[3]
if moved and count and ARGV[10] == '1' and ARGV[4] == 'P' then
  moved = not unchanged_row(KEYS[8], ARGV[3], count, KEYS[5])
end
if sget(KEYS[1]) ~= ARGV[2] or moved then
  if ARGV[1] ~= '' and sget(KEYS[4]) == ARGV[1] then redis.call('DEL', KEYS[4]) end
  return 0
end
if ARGV[1] ~= '' and sget(KEYS[4]) ~= ARGV[1] then return 0 end
if ARGV[4] == 'P' then
  local rv = sget(KEYS[5])
  -- A row version is a token too: junk there (a '|') would make the row unservable.
  if rv and not string.find(rv, '[^%w:_-]') then
    if rv ~= ARGV[7] then return {2, rv} end
    redis.call('PEXPIRE', KEYS[5], ARGV[8])
  else
    redis.call('SET', KEYS[5], ARGV[7], 'PX', ARGV[8])
  end
end
redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[6])
if ARGV[1] ~= '' then redis.call('DEL', KEYS[4]) end
-- The index (counts and cleanup without a SCAN) lives as long as its longest entry; junk
-- there must not cost the fill, hence pcall.
local keep = tonumber(ARGV[6]) + 60000
redis.pcall('ZADD', KEYS[6], ARGV[9], KEYS[3])
-- A few expired members go with each fill: the index stays about the size of what is live
-- even where cleanup never runs.
local expired = redis.pcall(
  'ZRANGEBYSCORE', KEYS[6], '-inf', tonumber(ARGV[9]) - tonumber(ARGV[6]), 'LIMIT', 0, 16)
if type(expired) == 'table' and not expired.err and #expired > 0 then
  redis.pcall('ZREM', KEYS[6], unpack(expired))
end
redis.pcall('SADD', KEYS[7], KEYS[6])
for i = 6, 7 do
  local left = redis.pcall('PTTL', KEYS[i])
  if type(left) == 'number' and left < keep then redis.pcall('PEXPIRE', KEYS[i], keep) end
end
return 1
