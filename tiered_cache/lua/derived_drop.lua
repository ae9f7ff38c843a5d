-- KEYS: data. ARGV: tombstone, ttl ms, channel ('' = the caller publishes), message.
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if ARGV[3] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return 1
