-- KEYS: data. ARGV: tombstone, ttl ms, channel, message.
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
