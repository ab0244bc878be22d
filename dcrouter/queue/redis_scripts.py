"""The Lua scripts of the Redis queue. Each one runs atomically in Redis: an item is visible completely or not
at all, and two processes never claim the same item while its lease is valid.

Keys, all under the queue's prefix ``P`` (``dcrouter:`` by default)::

    P item:<id>        hash: item (QueueItem JSON), status, seq, mk, created_at, next_attempt_at, due_score,
                       attempts, body ('inline' | 'chunks' | 'file'), ver, [dest], [owner, lease_until]
    P body:<id>        string: the body, when it is inline; list of its chunks (in order), when 'chunks'
    P seq              counter: arrival order
    P live             counter: items not delivered, bounced or failed (maxQueueSize, get_item_count)
    P items            zset seq -> id: every item, in arrival order (load's verification walks it)
    P wait             zset next_attempt_at -> id: ready items (queued, deferred) not yet moved to `due`
    P due              zset due_score -> mk: ready items whose time has come, in hand-out order
    P parked:<dest>    zset due_score -> mk: due items a scheduled claim found while <dest> was closed
    P parked           set of destinations that may have parked items (emptied lazily)
    P leases           zset lease expiry (Redis server time) -> id: claimed items
    P status:<status>  zset created_at -> mk, per status
    P dest:<dest>      zset created_at -> mk, per destination
    P damaged:<id>:<seq> (+ P damaged-body:<id>:<seq>)   items set aside by load(), never deleted

``mk`` is the arrival number zero-padded to 15 digits, ``:``, the id: members with equal scores sort by it,
which is arrival order. ``due_score`` is ``priority * 1e10 + created_at`` (computed by the caller), so one
sorted set gives priority first, then age, then arrival.

The hash's ``status`` field is the truth; the JSON's copy is refreshed whenever the caller rewrites the item.
Scripts only move ``status`` between ready and delivering (claims, expired leases) and never touch the JSON,
so no float is ever rewritten by Lua. ``ver`` grows with every change; ``update`` writes only if the version
it read is still current (optimistic concurrency between processes).

Leases use the Redis server's clock (``TIME``), so hosts with skewed clocks agree on when a claim expires.
A lease's owner is a consumer name (:mod:`dcrouter.queue.redis_consumer`), held by one live process at a
time and taken again by a restarted one.
This needs Redis 5 or later (scripts replicated by effects).
"""

from __future__ import annotations

_PRELUDE = r"""
local P = ARGV[1]
local function ikey(id) return P .. 'item:' .. id end
local function is_ready(st) return st == 'queued' or st == 'deferred' end
local function is_live(st) return not (st == 'delivered' or st == 'bounced' or st == 'failed') end
local function redis_now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function meta(id)
  local v = redis.call('HMGET', ikey(id), 'status', 'mk', 'dest', 'created_at', 'next_attempt_at',
                       'attempts', 'due_score')
  if not v[1] then return nil end
  return {status = v[1], mk = v[2], dest = v[3] or nil, created_at = v[4], next_attempt_at = v[5],
          attempts = v[6], due_score = v[7]}
end
local function index(id, m)
  redis.call('ZADD', P .. 'status:' .. m.status, m.created_at, m.mk)
  if m.dest then redis.call('ZADD', P .. 'dest:' .. m.dest, m.created_at, m.mk) end
  if is_ready(m.status) then redis.call('ZADD', P .. 'wait', m.next_attempt_at, id) end
end
local function unindex(id, m)
  redis.call('ZREM', P .. 'status:' .. m.status, m.mk)
  if m.dest then redis.call('ZREM', P .. 'dest:' .. m.dest, m.mk) end
  redis.call('ZREM', P .. 'wait', id)
  redis.call('ZREM', P .. 'due', m.mk)
  if m.dest then redis.call('ZREM', P .. 'parked:' .. m.dest, m.mk) end
  redis.call('ZREM', P .. 'leases', id)
end
local function set_status(id, m, new)
  redis.call('ZREM', P .. 'status:' .. m.status, m.mk)
  redis.call('ZADD', P .. 'status:' .. new, m.created_at, m.mk)
  redis.call('HSET', ikey(id), 'status', new)
  redis.call('HINCRBY', ikey(id), 'ver', 1)
  m.status = new
end
local function lease(id, owner, expiry)
  redis.call('HSET', ikey(id), 'owner', owner, 'lease_until', expiry)
  redis.call('ZADD', P .. 'leases', expiry, id)
end
-- A claim ends without a result (its process died, or it shut down): back to ready, due at once.
local function release(id, m)
  set_status(id, m, (tonumber(m.attempts) or 0) > 0 and 'deferred' or 'queued')
  redis.call('HDEL', ikey(id), 'owner', 'lease_until')
  redis.call('ZREM', P .. 'leases', id)
  redis.call('ZADD', P .. 'wait', m.next_attempt_at, id)
end
local function remove(id, out)
  local m = meta(id)
  if not m then return end
  local v = redis.call('HMGET', ikey(id), 'item', 'body')
  unindex(id, m)
  redis.call('ZREM', P .. 'items', id)
  if is_live(m.status) then redis.call('DECR', P .. 'live') end
  redis.call('DEL', ikey(id), P .. 'body:' .. id)
  table.insert(out, id)
  table.insert(out, v[1])
  table.insert(out, m.status)
  table.insert(out, v[2])
end
"""

#: ARGV: P, id, item JSON, status, created_at, next_attempt_at, due_score, has_dest, dest, attempts,
#: body kind ('inline' | 'chunks' | 'file'), inline body (for 'chunks': their number), max_size, owner,
#: lease seconds. Returns 'ok', 'exists', 'full' or 'nobody' (kind 'chunks' and not that many chunks: the
#: list expired before the item came, or a failover lost some). A chunk list (APPEND_CHUNK) loses its expiry
#: here: it is the item's body from now on.
ENQUEUE = (
    _PRELUDE
    + r"""
local id = ARGV[2]
local k = ikey(id)
if redis.call('EXISTS', k) == 1 then return 'exists' end
if ARGV[11] == 'chunks' and redis.call('LLEN', P .. 'body:' .. id) ~= tonumber(ARGV[12]) then
  return 'nobody'
end
local status = ARGV[4]
if is_live(status) then
  local max = tonumber(ARGV[13])
  if max > 0 and tonumber(redis.call('GET', P .. 'live') or '0') >= max then return 'full' end
  redis.call('INCR', P .. 'live')
end
local seq = tostring(redis.call('INCR', P .. 'seq'))
local m = {status = status, mk = string.rep('0', 15 - #seq) .. seq .. ':' .. id,
           created_at = ARGV[5], next_attempt_at = ARGV[6]}
redis.call('HSET', k, 'item', ARGV[3], 'status', status, 'seq', seq, 'mk', m.mk, 'created_at', ARGV[5],
           'next_attempt_at', ARGV[6], 'due_score', ARGV[7], 'attempts', ARGV[10], 'body', ARGV[11], 'ver', 1)
if ARGV[8] == '1' then
  m.dest = ARGV[9]
  redis.call('HSET', k, 'dest', ARGV[9])
end
if ARGV[11] == 'inline' then redis.call('SET', P .. 'body:' .. id, ARGV[12]) end
if ARGV[11] == 'chunks' then redis.call('PERSIST', P .. 'body:' .. id) end
redis.call('ZADD', P .. 'items', seq, id)
index(id, m)
if status == 'delivering' then lease(id, ARGV[14], redis_now() + tonumber(ARGV[15])) end
return 'ok'
"""
)

#: ARGV: P, id, chunk, expiry seconds, index (from 0). Appends one chunk of a body being stored to
#: ``body:<id>`` before its item exists, and (re)sets the list's expiry: a list whose item never comes (the
#: process died or Redis failed mid-way; no 250 was sent) disappears by itself. Returns 'ok'; 'exists' when
#: the first chunk finds a body already there (an id in use); 'gap' when the list does not hold exactly the
#: chunks before this one (a failover lost some): nothing is appended then.
APPEND_CHUNK = r"""
local k = ARGV[1] .. 'body:' .. ARGV[2]
if ARGV[5] == '0' and redis.call('EXISTS', k) == 1 then return 'exists' end
if redis.call('LLEN', k) ~= tonumber(ARGV[5]) then return 'gap' end
redis.call('RPUSH', k, ARGV[3])
redis.call('EXPIRE', k, tonumber(ARGV[4]))
return 'ok'
"""

#: ARGV: P, id, expected ver, item JSON, status, created_at, next_attempt_at, due_score, has_dest, dest,
#: attempts, owner, lease seconds. Returns 'ok', 'missing' or 'conflict' (changed since it was read).
UPDATE = (
    _PRELUDE
    + r"""
local id = ARGV[2]
local k = ikey(id)
local m = meta(id)
if not m then return 'missing' end
if redis.call('HGET', k, 'ver') ~= ARGV[3] then return 'conflict' end
unindex(id, m)
local new = {status = ARGV[5], mk = m.mk, created_at = ARGV[6], next_attempt_at = ARGV[7]}
if ARGV[9] == '1' then
  new.dest = ARGV[10]
  redis.call('HSET', k, 'dest', ARGV[10])
else
  redis.call('HDEL', k, 'dest')
end
redis.call('HSET', k, 'item', ARGV[4], 'status', new.status, 'created_at', ARGV[6],
           'next_attempt_at', ARGV[7], 'due_score', ARGV[8], 'attempts', ARGV[11])
redis.call('HINCRBY', k, 'ver', 1)
local delta = (is_live(new.status) and 1 or 0) - (is_live(m.status) and 1 or 0)
if delta ~= 0 then redis.call('INCRBY', P .. 'live', delta) end
index(id, new)
if new.status == 'delivering' then
  lease(id, ARGV[12], redis_now() + tonumber(ARGV[13]))
else
  redis.call('HDEL', k, 'owner', 'lease_until')
end
return 'ok'
"""
)

#: ARGV: P, now (caller's clock), count, owner, lease seconds, reclaim limit, promote limit, [body limit,
#: then for a scheduled claim (ClaimSchedule): '1', unrouted limit, default limit, scan window, then
#: destination, limit pairs]. Returns {expired leases returned to ready, then for each claimed item: id, item
#: JSON, ver, 1 and its inline body when that is at most ``body limit`` bytes (else 0 and '')}; the claimed
#: items are DELIVERING.
#:
#: A scheduled claim looks at the first ``scan window`` members of ``due``; those of a closed destination
#: (limit 0) move to ``parked:<dest>`` (so the next claims walk past them for good), and with them as
#: candidates come the first parked items of every destination now open. It hands out round robin over the
#: candidates' destinations, each up to its limit, as :func:`dcrouter.queue.contract.pick` does.
CLAIM = (
    _PRELUDE
    + r"""
-- The members of due (or parked) to claim, taken out of their set: see above.
local PARK_BUDGET = 4096
local function schedule(count)
  -- Without a schedule (a caller other than delivery) every destination is open: parked items come back.
  local unrouted, default, window = count, count, count
  local limits = {}
  if ARGV[9] == '1' then
    unrouted, default, window = tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[12])
    for i = 13, #ARGV - 1, 2 do limits[ARGV[i]] = tonumber(ARGV[i + 1]) end
  end
  local function limit(dest)
    if not dest then return unrouted end
    return limits[dest] or default
  end
  local found, taken = {}, {}
  for _, dest in ipairs(redis.call('SMEMBERS', P .. 'parked')) do
    local n = math.min(limit(dest), count)
    if n > 0 then
      local parked = redis.call('ZRANGE', P .. 'parked:' .. dest, 0, n - 1, 'WITHSCORES')
      if #parked == 0 then redis.call('SREM', P .. 'parked', dest) end
      taken[dest] = #parked / 2
      for i = 1, #parked, 2 do
        table.insert(found, {score = tonumber(parked[i + 1]), mk = parked[i], dest = dest, parked = true})
      end
    end
  end
  -- A destination's items beyond what it may take now are parked too: the window then moves on past a
  -- backlog whatever its destination's free slots, and the parked items come back first once it has room.
  -- Window after window while the last one parked something and too little was found: up to PARK_BUDGET
  -- items parked per claim (each only once: a backlog is walked past once, not at every claim).
  local start, parked_now, open = 0, 0, #found
  while true do
    local front = redis.call('ZRANGE', P .. 'due', start, start + window - 1, 'WITHSCORES')
    local parked_here = 0
    for i = 1, #front, 2 do
      local mk, score = front[i], front[i + 1]
      local dest = redis.call('HGET', ikey(string.sub(mk, 17)), 'dest') or nil
      if dest then taken[dest] = (taken[dest] or 0) + 1 end
      if dest and taken[dest] > limit(dest) then
        redis.call('ZREM', P .. 'due', mk)
        redis.call('ZADD', P .. 'parked:' .. dest, score, mk)
        redis.call('SADD', P .. 'parked', dest)
        parked_here = parked_here + 1
      else
        table.insert(found, {score = tonumber(score), mk = mk, dest = dest, parked = false})
        open = open + 1
      end
    end
    parked_now = parked_now + parked_here
    if #front < 2 * window or parked_here == 0 or open >= count or parked_now >= PARK_BUDGET then break end
    start = start + window - parked_here
  end
  table.sort(found, function(a, b)
    if a.score ~= b.score then return a.score < b.score end
    return a.mk < b.mk
  end)
  local groups, order = {}, {}
  for _, c in ipairs(found) do
    local key = c.dest and ('d:' .. c.dest) or 'u'
    local g = groups[key]
    if not g then
      g = {}
      groups[key] = g
      table.insert(order, g)
    end
    if #g < limit(c.dest) then table.insert(g, c) end
  end
  local chosen, turn, more = {}, 1, true
  while more and #chosen < count do
    more = false
    for _, g in ipairs(order) do
      local c = g[turn]
      if c and #chosen < count then
        table.insert(chosen, c.mk)
        if c.parked then
          redis.call('ZREM', P .. 'parked:' .. c.dest, c.mk)
        else
          redis.call('ZREM', P .. 'due', c.mk)
        end
        more = true
      end
    end
    turn = turn + 1
  end
  return chosen
end
local rnow = redis_now()
local returned = 0
local expired = redis.call('ZRANGEBYSCORE', P .. 'leases', '-inf', rnow, 'LIMIT', 0, tonumber(ARGV[6]))
for _, id in ipairs(expired) do
  local m = meta(id)
  if m and m.status == 'delivering' then
    release(id, m)
    returned = returned + 1
  else
    redis.call('ZREM', P .. 'leases', id)
  end
end
local now_due = redis.call('ZRANGEBYSCORE', P .. 'wait', '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[7]))
for _, id in ipairs(now_due) do
  local v = redis.call('HMGET', ikey(id), 'due_score', 'mk')
  redis.call('ZREM', P .. 'wait', id)
  if v[1] then redis.call('ZADD', P .. 'due', v[1], v[2]) end
end
local out = {returned}
local count = tonumber(ARGV[3])
local body_limit = tonumber(ARGV[8] or '0')
if count > 0 then
  local expiry = rnow + tonumber(ARGV[5])
  local chosen
  if ARGV[9] == '1' or redis.call('EXISTS', P .. 'parked') == 1 then
    chosen = schedule(count)
  else
    chosen = redis.call('ZRANGE', P .. 'due', 0, count - 1)
    for _, mk in ipairs(chosen) do redis.call('ZREM', P .. 'due', mk) end
  end
  for _, mk in ipairs(chosen) do
    local id = string.sub(mk, 17)
    local m = meta(id)
    if m and is_ready(m.status) then
      set_status(id, m, 'delivering')
      lease(id, ARGV[4], expiry)
      local v = redis.call('HMGET', ikey(id), 'item', 'ver', 'body')
      table.insert(out, id)
      table.insert(out, v[1])
      table.insert(out, v[2])
      -- A missing body (a damaged item) is not handed out: open_body then reports it.
      local body = false
      if v[3] == 'inline' and redis.call('STRLEN', P .. 'body:' .. id) <= body_limit then
        body = redis.call('GET', P .. 'body:' .. id)
      end
      if body then
        table.insert(out, 1)
        table.insert(out, body)
      else
        table.insert(out, 0)
        table.insert(out, '')
      end
    end
  end
end
return out
"""
)

#: ARGV: P, owner, lease seconds, id... Extends the leases ``owner`` still holds; returns the ids it no
#: longer holds (taken over after expiry, finished elsewhere, or removed).
RENEW = (
    _PRELUDE
    + r"""
local expiry = redis_now() + tonumber(ARGV[3])
local lost = {}
for i = 4, #ARGV do
  local id = ARGV[i]
  local v = redis.call('HMGET', ikey(id), 'status', 'owner')
  if v[1] == 'delivering' and v[2] == ARGV[2] then
    lease(id, ARGV[2], expiry)
  else
    table.insert(lost, id)
  end
end
return lost
"""
)

#: ARGV: P, owner, id... Returns the claims ``owner`` still holds to ready (a clean shutdown); returns how
#: many.
RELEASE = (
    _PRELUDE
    + r"""
local n = 0
for i = 3, #ARGV do
  local id = ARGV[i]
  local m = meta(id)
  if m and m.status == 'delivering' and redis.call('HGET', ikey(id), 'owner') == ARGV[2] then
    release(id, m)
    n = n + 1
  end
end
return n
"""
)

#: ARGV: P, owner. Returns every claim ``owner`` holds to ready, whatever its lease (the consumer's previous
#: run died: :mod:`dcrouter.queue.redis_consumer`); returns how many. Walks ``leases``, which holds only the
#: claims in flight of every process (bounded by their ``concurrentDeliveries``).
RELEASE_OWNED = (
    _PRELUDE
    + r"""
local n = 0
for _, id in ipairs(redis.call('ZRANGE', P .. 'leases', 0, -1)) do
  local m = meta(id)
  if m and m.status == 'delivering' and redis.call('HGET', ikey(id), 'owner') == ARGV[2] then
    release(id, m)
    n = n + 1
  end
end
return n
"""
)

#: ARGV: P, id... Removes the items; returns {id, item JSON, status, body kind} for each one that existed.
REMOVE = (
    _PRELUDE
    + r"""
local out = {}
for i = 2, #ARGV do remove(ARGV[i], out) end
return out
"""
)

#: ARGV: P, id, status. Removes the item only while it is in ``status``: returns {'removed', then what REMOVE
#: returns}, {'other', item JSON, status} (nothing removed) or {'missing'}.
REMOVE_IF = (
    _PRELUDE
    + r"""
local id = ARGV[2]
local v = redis.call('HMGET', ikey(id), 'item', 'status')
if not v[1] then return {'missing'} end
if v[2] ~= ARGV[3] then return {'other', v[1], v[2]} end
local out = {'removed'}
remove(id, out)
return out
"""
)

#: ARGV: P, cutoff, limit. Removes up to ``limit`` items in a final status created before ``cutoff``;
#: returns what REMOVE returns.
PURGE_FINAL = (
    _PRELUDE
    + r"""
local out = {}
local left = tonumber(ARGV[3])
for _, st in ipairs({'delivered', 'bounced', 'failed'}) do
  if left <= 0 then break end
  local old = redis.call('ZRANGEBYSCORE', P .. 'status:' .. st, '-inf', '(' .. ARGV[2], 'LIMIT', 0, left)
  for _, mk in ipairs(old) do
    remove(string.sub(mk, 17), out)
    left = left - 1
  end
end
return out
"""
)

#: ARGV: P, limit. Removes up to ``limit`` items, oldest arrival first; returns what REMOVE returns.
PURGE_SOME = (
    _PRELUDE
    + r"""
local out = {}
for _, id in ipairs(redis.call('ZRANGE', P .. 'items', 0, tonumber(ARGV[2]) - 1)) do remove(id, out) end
return out
"""
)

#: ARGV: P, index key suffix ('status:queued', 'dest:mx.example'). Returns {id, item JSON, status, ...} in
#: index order (creation time, then arrival).
SELECT = (
    _PRELUDE
    + r"""
local out = {}
for _, mk in ipairs(redis.call('ZRANGE', P .. ARGV[2], 0, -1)) do
  local id = string.sub(mk, 17)
  local v = redis.call('HMGET', ikey(id), 'item', 'status')
  if v[1] then
    table.insert(out, id)
    table.insert(out, v[1])
    table.insert(out, v[2])
  end
end
return out
"""
)

#: ARGV: P, after seq, limit. Returns {id, seq, item JSON or '', status or '', body kind or '', inline body
#: present (0/1), ...} for the next ``limit`` items in arrival order: what load() verifies.
SCAN = (
    _PRELUDE
    + r"""
local out = {}
local ids = redis.call('ZRANGEBYSCORE', P .. 'items', '(' .. ARGV[2], '+inf', 'WITHSCORES',
                      'LIMIT', 0, tonumber(ARGV[3]))
for i = 1, #ids, 2 do
  local id = ids[i]
  local v = redis.call('HMGET', ikey(id), 'item', 'status', 'body')
  table.insert(out, id)
  table.insert(out, ids[i + 1])
  table.insert(out, v[1] or '')
  table.insert(out, v[2] or '')
  table.insert(out, v[3] or '')
  table.insert(out, redis.call('EXISTS', P .. 'body:' .. id))
end
return out
"""
)

#: ARGV: P, id, seq seen, reason. Moves a damaged item (and its inline body) out of every index to
#: ``damaged:<id>:<seq>``, unless it changed since it was read. Returns 1 if moved, else 0.
SET_ASIDE = (
    _PRELUDE
    + r"""
local id = ARGV[2]
local k = ikey(id)
local seq = redis.call('ZSCORE', P .. 'items', id)
if not seq or tostring(tonumber(seq)) ~= ARGV[3] then return 0 end
local v = redis.call('HMGET', k, 'status', 'mk', 'dest')
if v[1] and v[2] then
  unindex(id, {status = v[1], mk = v[2], dest = v[3] or nil})
  if is_live(v[1]) then redis.call('DECR', P .. 'live') end
end
redis.call('ZREM', P .. 'wait', id)
redis.call('ZREM', P .. 'leases', id)
redis.call('ZREM', P .. 'items', id)
local target = P .. 'damaged:' .. id .. ':' .. ARGV[3]
if redis.call('EXISTS', k) == 1 then
  redis.call('RENAME', k, target)
else
  redis.call('HSET', target, 'missing', 'item hash')
end
redis.call('HSET', target, 'reason', ARGV[4])
if redis.call('EXISTS', P .. 'body:' .. id) == 1 then
  redis.call('RENAME', P .. 'body:' .. id, P .. 'damaged-body:' .. id .. ':' .. ARGV[3])
end
return 1
"""
)

#: ARGV: P, before seq ('' for the newest), wanted, budget, status, destination, sender, recipient (each ''
#: for any; sender and recipient lower-cased substrings). Walks ``items`` newest first from below ``before``,
#: looking at ``budget`` items at most, and returns {continue from seq ('' when the walk reached the oldest),
#: then id, seq, item JSON, status for each match, up to ``wanted``}.
LIST = (
    _PRELUDE
    + r"""
local out = {''}
local max = '+inf'
if ARGV[2] ~= '' then max = '(' .. ARGV[2] end
local budget = tonumber(ARGV[4])
local ids = redis.call('ZREVRANGEBYSCORE', P .. 'items', max, '-inf', 'WITHSCORES', 'LIMIT', 0, budget)
local want = tonumber(ARGV[3])
local found = 0
local last = ''
for i = 1, #ids, 2 do
  local id = ids[i]
  last = ids[i + 1]
  local v = redis.call('HMGET', ikey(id), 'item', 'status', 'dest')
  local ok = v[1] ~= false and v[1] ~= nil
  if ok and ARGV[5] ~= '' and v[2] ~= ARGV[5] then ok = false end
  if ok and ARGV[6] ~= '' and v[3] ~= ARGV[6] then ok = false end
  if ok and (ARGV[7] ~= '' or ARGV[8] ~= '') then
    local env = cjson.decode(v[1]).envelope
    if ARGV[7] ~= '' and not string.find(string.lower(env.mail_from), ARGV[7], 1, true) then ok = false end
    if ok and ARGV[8] ~= '' then
      local hit = false
      for _, r in ipairs(env.recipients) do
        if string.find(string.lower(r), ARGV[8], 1, true) then
          hit = true
          break
        end
      end
      ok = hit
    end
  end
  if ok then
    table.insert(out, id)
    table.insert(out, ids[i + 1])
    table.insert(out, v[1])
    table.insert(out, v[2])
    found = found + 1
    if found == want then
      out[1] = last
      return out
    end
  end
end
if #ids == 2 * budget then out[1] = last end
return out
"""
)

#: ARGV: P, status... Returns the number of items in each status, in ARGV order.
#: count_by_destination, one bounded step: the destinations of the items of ``status:<ARGV[2]>`` from rank
#: ARGV[3], ARGV[4] items at most. Returns {next rank or '' when done, destination, count, ...} (items with
#: no destination under '').
COUNT_DESTINATIONS = (
    _PRELUDE
    + r"""
local start, budget = tonumber(ARGV[3]), tonumber(ARGV[4])
local members = redis.call('ZRANGE', P .. 'status:' .. ARGV[2], start, start + budget - 1)
local counts = {}
for _, mk in ipairs(members) do
  local dest = redis.call('HGET', ikey(string.match(mk, '[^:]+$')), 'dest') or ''
  counts[dest] = (counts[dest] or 0) + 1
end
local out = {''}
if #members == budget then out[1] = tostring(start + budget) end
for dest, n in pairs(counts) do
  table.insert(out, dest)
  table.insert(out, n)
end
return out
"""
)

COUNT_BY_STATUS = (
    _PRELUDE
    + r"""
local out = {}
for i = 2, #ARGV do table.insert(out, redis.call('ZCARD', P .. 'status:' .. ARGV[i])) end
return out
"""
)
