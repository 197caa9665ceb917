#!lua name=pointauth_$VERSION
-- pointauth ledger: every state change of one account, atomically, in one function call.
-- A Redis Functions library; _ledger.py puts a hash of this file where the names say VERSION,
-- so each version has a library and functions of its own: servers of two releases share one
-- Redis during a rolling deploy without either replacing what the other calls.
--
-- KEYS (all in the account's hash slot; codec.py defines each format):
--   1 account hash   fields: seq, x0, xt (see prune_transactions), lp (points in the lots), hp
--                    (points on hold), st (status, absent while active), ot/ct (opened, closed
--                    ms), c:<card number> for each card of the account, and the member's
--                    profile (bd, jt, hc, a:<attribute>)
--   2 transactions   hash: <seq> = msgpack record (for holds, refunds and receipts)
--   3 lots           sorted set, a member "<id key>:<points>:<issuer>" per lot, scored
--                    expiry * 2 + (0 limited-time, 1 regular): ascending is the spending order
--   4 open holds     sorted set, a member "<hold seq>:<points>" per open hold, by expiry
--   5 hold index     sorted set of the shard's open holds "<account>.<seq>" by expiry (sweeper)
--   6 events         the shard's stream, read by the write-behind worker
--   7 merges         sorted set of the shard's accounts merged out whose merge is not yet
--                    finished (the recovery pass's list), by merge time
--   8 idempotency    string "<fingerprint><msgpack result>" (mutations only)
-- ARGV: op, now_ms, account_id, fingerprint, idempotency_expires_ms (Unix ms, wall clock),
--   tx_retention_ms, msgpack args,
--   and for a refund of a merged account's transaction, its record
--   A call made for a card (earn, authorize, redeem, balance, account) names it in args.via: the
--   server found the account from a cache or the card index, either of which may be stale once
--   cards move, so the call checks that the card is still this account's before anything else,
--   and that it is not blocked (args.any_state: any state will do, for GetAccount).
--
-- Shape of every call: replay check, load, expire what time has expired (in memory), validate,
-- and only then write. A refusal writes nothing but its idempotency record, so a retry gets
-- the same refusal even after the balance has changed. Points are Lua numbers (doubles):
-- exact because the server caps every amount and balance below 2^53.
--
-- Cost does not grow with the account: a call reads the account hash's four fields, the lots
-- it spends or gives back to (range reads of the lots' sorted set in spending order), the lots
-- and holds time has expired (range reads up to now) and the records it names; the totals are
-- kept in the account hash and adjusted by each change. Only GetBalance, whose answer lists
-- every lot, reads them all (one range read, already in order).
--
-- Lots of one expiry, kind and issuer are one lot (a "bucket"): an earn into a bucket the
-- account has adds to that lot, which keeps its id (the earliest earn's seq). Points given
-- back (void, release, hold expiry, refund of a use) go to the lot they came from if it is
-- still stored, else to the lot of its bucket, else recreate it with its own id; the event's
-- lot effects name the lot actually changed, so the journal's projection stays a copy.

-- Functions are defined once, when Redis loads the library; what a call works on lives in the
-- variables below, every one of them set anew by ledger() as the call begins, so nothing survives
-- from one call to the next (defining the ~90 functions inside the callback, as before, cost
-- some 25 us of Redis time per call: a closure each).
-- The call's ARGV and KEYS, as listed above (ARGS: the msgpack args; BLOB: a foreign record).
local OP, NOW, ACCOUNT, FINGERPRINT, IDEM_EXP, TX_RETENTION, ARGS, BLOB
local K_ACCOUNT, K_TX, K_LOTS, K_OPEN, K_HOLDS, K_EVENTS, K_MERGES, K_IDEM
-- NAMED_TX: the record the company check read (kept for tx_get); VIA_CARD: the `c:` field of the
-- card the call was made for.
local NAMED_TX, VIA_CARD
-- `lots`: the lots this call has read or made, by id; `buckets`: the same by expiry, kind and
-- issuer; `scores`: the sorted set scores whose lots have all been read. `lp`/`hp`: the stored
-- totals as this call changes them; `expired`: the part of `lp` in lots past their expiry.
-- `fields`: account hash fields to set at commit ('' removes one).
local A
local MAX_BALANCE = 1000000000000000
-- Lots read per range read while spending: a spend rarely touches more than one or two.
local SPEND_PAGE = 8
-- Arguments per command when writing many members at once (Lua's unpack has a stack limit).
local BATCH = 1000
-- Holds past their TTL released per call. Each costs Redis some 176,000 instructions (its record,
-- its event, the lots it gives back to), and an account whose holds all expired at once (a till
-- that never captured, a burst) would otherwise hold Redis for every other till while one call
-- released them all: 1,000 holds, tens of ms. Past this many, a call releases them, writes that,
-- and answers EXPIRY_CONTINUES instead of doing its op (codec.py): the server calls again.
local EXPIRE_PAGE = 50
-- EXPIRE_PAGE + 1 and SPEND_PAGE as text: a number passed to redis.call is turned into text
-- on every call (and a library's top level cannot call string.format).
local EXPIRE_READ, SPEND_READ = '51', '8'

local function fmt(n) return string.format('%d', n) end

-- A caller bound to a company (ARGS.co: a till's, from its credential) may capture, void or
-- refund only holds and transactions made at its own company's points of sale (the record's
-- pos); the request names only an id, which anyone can guess. Another company's is answered
-- exactly as an unknown id is, so nothing can be probed: before the replay check (a stranger
-- replaying an owner's request id gets neither its answer nor IDEMPOTENCY_KEY_REUSED) and
-- writing nothing at all, not even an idempotency record. A record that is not there is left to
-- the op, which answers it as it always has. No ARGS.co (an operator, auth off): no check.
-- The record read here is kept for tx_get: the check costs no second read.
local CO_SCOPED = {capture = 'hold', void = 'hold', refund = 'orig'}

-- A call made for a card that is not (or no longer) this account's: NOT_FOUND CARD_NOT_FOUND,
-- writing nothing at all (no idempotency record, no event), so that the server can look the
-- card up again and make the same call on the account that has it. After the replay check, so
-- that a retry of an earlier success answers as before; its field is read with the account (load).
-- A merged account's cards went to the account it was merged into: ACCOUNT_MERGED naming it,
-- writing nothing, and the server follows.
local function merged_into(target)
  return cmsgpack.pack({code = 'FAILED_PRECONDITION', reason = 'ACCOUNT_MERGED', message = 'account ' .. ACCOUNT
    .. ' was merged into ' .. target, meta = {merged_into_account_id = target}})
end

-- The account hash: codec.py, StoredAccount (written in commit()). One read, with the `c:` field
-- of the card the call names (VIA_CARD; false: the account has no such card).
local function load()
  -- (No card: `seq` a second time, unread.)
  local raw = redis.call('HMGET', K_ACCOUNT, 'seq', 'x0', 'lp', 'hp', 'st', 'mt', 'xt',
    ARGS.via and 'c:' .. ARGS.via or 'seq')
  A.exists = raw[1] ~= false
  A.status = raw[5] or 'A'
  A.merged_into = raw[6]
  -- Every writer of this layout writes lp; an account hash without it is of the layout before
  -- lots had their own set (its points in l: fields this script does not read).
  A.older_layout = A.exists and raw[3] == false
  A.seq = tonumber(raw[1] or 0)
  A.x0 = tonumber(raw[2] or 1)
  A.lp = tonumber(raw[3] or 0)
  A.hp = tonumber(raw[4] or 0)
  A.xt = tonumber(raw[7] or 0)
  VIA_CARD = ARGS.via and raw[8]
end

-- Transaction records: codec.py, TransactionRecord (built by new_tx()).
local function tx_get(seq)
  local rec = A.tx[seq]
  if rec == nil then
    local raw = redis.call('HGET', K_TX, fmt(seq))
    rec = raw and cmsgpack.unpack(raw) or false
    A.tx[seq] = rec
  end
  return rec or nil
end

local function tx_put(seq, rec)
  A.tx[seq] = rec
  A.dirty_tx[seq] = true
end

-- (A table with nothing in it, the common case on the hot path, costs no new table and no sort.)
local NO_KEYS = {}
local function sorted_keys(t)
  if next(t) == nil then return NO_KEYS end
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

-- Calls `cmd key ...` with `args` (a flat list; BATCH is even, so pairs stay whole), BATCH
-- arguments at a time.
local function call_batched(cmd, key, args)
  for i = 1, #args, BATCH do
    redis.call(cmd, key, unpack(args, i, math.min(i + BATCH - 1, #args)))
  end
end

-- The lots' sorted set: codec.py, lot_score and lot_member. The score orders by expiry, then
-- limited-time first; at an equal score Redis orders members by their bytes, and the id key (a
-- letter saying how many digits, then the digits) makes that the lots' ids in numeric order.
local function lot_score(exp, kind) return exp * 2 + (kind == 'L' and 0 or 1) end
local function id_key(id)
  local digits = fmt(id)
  return string.char(96 + #digits) .. digits
end
local function lot_member(l) return id_key(l.id) .. ':' .. fmt(l.pts) .. ':' .. l.iss end
local function bucket_of(score, iss) return fmt(score) .. ':' .. iss end

-- A member of the lots' set and its score (as text): {id, points, exp, kind, issuer}. Plain
-- finds rather than a pattern: GetBalance parses every lot, and this halves what that costs.
local function parse_lot(member, score_text)
  local id_end = string.byte(member, 1) - 95
  local colon = string.find(member, ':', id_end + 2, true)
  local score = tonumber(score_text)
  return {tonumber(string.sub(member, 2, id_end)), tonumber(string.sub(member, id_end + 2, colon - 1)),
    math.floor(score / 2), score % 2 == 0 and 'L' or 'R', string.sub(member, colon + 1)}
end

-- A lot as a range read returned it: the lot already read this call if there is one (its points
-- may have changed since), else the stored one, remembered.
local function read_lot(member, score_text)
  local p = parse_lot(member, score_text)
  local l = A.lots[p[1]]
  if l then return l end
  l = {id = p[1], pts = p[2], exp = p[3], kind = p[4], iss = p[5], stored = member}
  A.lots[l.id] = l
  local bucket = bucket_of(lot_score(l.exp, l.kind), l.iss)
  A.buckets[bucket] = A.buckets[bucket] or l
  if l.exp <= NOW then A.expired = A.expired + l.pts end
  return l
end

-- Every change of a lot's points goes through here, keeping the totals.
local function add_pts(l, n)
  l.pts = l.pts + n
  A.lp = A.lp + n
  if l.exp <= NOW then A.expired = A.expired + n end
  A.dirty_lots[l.id] = l
end

-- The lot points go to (or come back from) for allocation entry or lot effect `e` = {id, _,
-- exp, kind, issuer}: the lot `e` names if it is stored, else the lot of its bucket; nil if
-- neither is. With no id: the bucket's lot. One range read per expiry and kind, per call.
local function find_lot(id, exp, kind, iss)
  if id and A.lots[id] then return A.lots[id] end
  local score = lot_score(exp, kind)
  if not A.scores[score] then
    A.scores[score] = true
    local raw = redis.call('ZRANGEBYSCORE', K_LOTS, fmt(score), fmt(score), 'WITHSCORES')
    for i = 1, #raw, 2 do read_lot(raw[i], raw[i + 1]) end
  end
  return (id and A.lots[id]) or A.buckets[bucket_of(score, iss)]
end

-- A lot's id is the seq of the event that made it; an event making several lots (a merge, a
-- refund of a merged account's transaction) numbers the k-th after the first seq + k * 2^40
-- (codec.py, extra_lot_id): distinct from every seq an account will ever reach.
local function fresh_lot_id()
  local k = A.fresh or 0
  A.fresh = k + 1
  return A.seq + 1 + k * 1099511627776
end

-- A lot that is not stored (find_lot found none): empty until points are added.
local function new_lot(id, exp, kind, iss)
  local l = {id = id, pts = 0, exp = exp, kind = kind, iss = iss}
  A.lots[id] = l
  local bucket = bucket_of(lot_score(exp, kind), iss)
  A.buckets[bucket] = A.buckets[bucket] or l
  return l
end

-- Writes the lots changed so far: a lot's member names its points, so a change replaces it; an
-- emptied lot is removed.
local function flush_lots()
  if next(A.dirty_lots) == nil then return end
  local rem, add = {}, {}
  for _, id in ipairs(sorted_keys(A.dirty_lots)) do
    local l = A.lots[id]
    local member = l.pts > 0 and lot_member(l) or nil
    if member ~= l.stored then
      if l.stored then rem[#rem + 1] = l.stored end
      if member then
        add[#add + 1] = fmt(lot_score(l.exp, l.kind))
        add[#add + 1] = member
      end
      l.stored = member
    end
  end
  A.dirty_lots = {}
  if #rem > 0 then call_batched('ZREM', K_LOTS, rem) end
  if #add > 0 then call_batched('ZADD', K_LOTS, add) end
end

local function available() return A.lp - A.expired end

local function held() return A.hp end

-- Events: codec.py, Event (appended to the stream in commit()). Each carries what this script
-- derived (allocations, what went back where, the balance after it), so that the journal copies
-- instead of computing it again. The balance is taken here: every change an event stands for is
-- made before its emit, and nothing changes the balance after the last one.
local function emit(ev)
  A.seq = A.seq + 1
  ev.seq = A.seq
  ev.account = ACCOUNT
  ev.time = NOW
  ev.available = available()
  ev.held = held()
  A.events[#A.events + 1] = ev
  return A.seq
end

-- Takes `amount` points from the spendable lots (from lot effect `first`'s lot first, if
-- given); returns the allocation in spending order:
-- {{lot id, points, exp, kind, issuer, returned}, ...} (codec.py, AllocEntry).
-- Spending order: soonest expiry first; at equal expiry limited-time points first; then oldest
-- (the sorted set's order). Only called once the call is sure to succeed: it writes.
local function take(amount, first)
  local alloc, rest = {}, amount
  local function use(l)
    local n = math.min(l.pts, rest)
    if n > 0 then
      add_pts(l, -n)
      rest = rest - n
      alloc[#alloc + 1] = {l.id, n, l.exp, l.kind, l.iss, 0}
    end
  end
  if first then
    local l = find_lot(first[1], first[3], first[4], first[5])
    if l and l.exp > NOW then use(l) end
  end
  -- Once written, the sorted set holds the lots as this call has them: read it in spending
  -- order, a page at a time, only as far as the amount needs.
  flush_lots()
  local offset = 0
  while rest > 0 do
    local raw = redis.call('ZRANGEBYSCORE', K_LOTS, '(' .. fmt(lot_score(NOW, 'R')), '+inf', 'WITHSCORES',
      'LIMIT', offset == 0 and '0' or fmt(offset), SPEND_READ)
    for i = 1, #raw, 2 do
      if rest == 0 then break end
      use(read_lot(raw[i], raw[i + 1]))
    end
    if #raw < 2 * SPEND_PAGE then break end
    offset = offset + SPEND_PAGE
  end
  return alloc
end

-- Puts n points back where allocation entry `e` took them from, recreating the lot (with its
-- original id, expiry, kind and issuer) if it was emptied and removed; returns the lot effect.
local function give_back(e, n)
  local l = find_lot(e[1], e[3], e[4], e[5]) or new_lot(e[1] or fresh_lot_id(), e[3], e[4], e[5])
  add_pts(l, n)
  return {l.id, n, l.exp, l.kind, l.iss}
end

-- Lot effects {{lot id, signed points, exp, kind, issuer}, ...}: codec.py, LotEntry.
local function effects(alloc, sign)
  local out = {}
  for i, e in ipairs(alloc) do out[i] = {e[1], sign * e[2], e[3], e[4], e[5]} end
  return out
end

-- Hold index members are the holds' ids "<account>.<seq>" (codec.py, hold_member); the
-- account's open holds' members "<seq>:<points>" (codec.py, open_hold_member).
local function hold_member(seq) return ACCOUNT .. '.' .. fmt(seq) end
local function open_member(seq, pts) return fmt(seq) .. ':' .. fmt(pts) end

local function add_hold(seq, pts, exp)
  A.hp = A.hp + pts
  A.open_add[#A.open_add + 1] = fmt(exp)
  A.open_add[#A.open_add + 1] = open_member(seq, pts)
  A.hold_add[#A.hold_add + 1] = {hold_member(seq), exp}
end

local function drop_hold(seq, pts)
  A.hp = A.hp - pts
  A.open_rem[#A.open_rem + 1] = open_member(seq, pts)
  A.hold_rem[#A.hold_rem + 1] = hold_member(seq)
end

-- Time-driven changes: holds past their TTL give their points back, then lots past their
-- expiry lose what is left. Both are events, so the journal records breakage. Only what has
-- expired is read: the range up to now of each sorted set.
local function expire()
  -- The expired lots are read first, so that the balance in a HOLD_EXPIRED event leaves them
  -- out (available() does), as it always has.
  local raw = redis.call('ZRANGEBYSCORE', K_LOTS, '-inf', fmt(lot_score(NOW, 'R')), 'WITHSCORES')
  for i = 1, #raw, 2 do read_lot(raw[i], raw[i + 1]) end
  local due = redis.call('ZRANGEBYSCORE', K_OPEN, '-inf', fmt(NOW), 'LIMIT', '0', EXPIRE_READ)
  if #due > EXPIRE_PAGE then
    A.more_expired = true
    due[#due] = nil -- the first EXPIRE_PAGE to expire; the next call goes on from there
  end
  local seqs = {}
  for i, member in ipairs(due) do seqs[i] = tonumber(string.match(member, '^(%d+):')) end
  table.sort(seqs) -- one event per hold, in the order of the holds
  for _, seq in ipairs(seqs) do
    local rec = tx_get(seq)
    local lots = {}
    for i, e in ipairs(rec.alloc) do lots[i] = give_back(e, e[2]) end
    rec.state = 'EXPIRED'
    rec.released = rec.pts
    tx_put(seq, rec)
    drop_hold(seq, rec.pts)
    emit({type = 'HOLD_EXPIRED', pts = rec.pts, ref = seq, lots = lots})
  end
  -- The lots read so far: those past their expiry and those the holds gave back to.
  local gone, total = {}, 0
  for _, id in ipairs(sorted_keys(A.lots)) do
    local l = A.lots[id]
    if l.exp <= NOW and l.pts > 0 then
      gone[#gone + 1] = {id, -l.pts, l.exp, l.kind, l.iss}
      total = total + l.pts
      add_pts(l, -l.pts)
    end
  end
  if #gone > 0 then emit({type = 'LOTS_EXPIRED', pts = total, lots = gone}) end
end

-- Transaction records are kept for the refund window; each commit forgets a few older ones.
-- A.xt: the time of record x0 when pruning last stopped at it for its age (0: unknown), so that
-- until that record ages out a commit reads nothing to find that nothing is due (a record's
-- time never changes, and only this moves x0).
local function prune_transactions(writes)
  if A.xt > NOW - TX_RETENTION then return end
  A.xt = 0
  local budget = 4
  while budget > 0 and A.x0 <= A.seq do
    local rec = tx_get(A.x0)
    if rec then
      if rec.time > NOW - TX_RETENTION then
        A.xt = rec.time
        break
      end
      if rec.type == 'HOLD' and rec.state == 'HELD' then break end
      writes[#writes + 1] = fmt(A.x0)
      A.tx[A.x0] = false
    end
    A.x0 = A.x0 + 1
    budget = budget - 1
  end
end

-- Writes the account hash (codec.py, AccountFields), the changed lots, open holds and records,
-- the hold index and the events.
local function commit()
  flush_lots()
  local forget = {}
  if next(A.dirty_tx) then prune_transactions(forget) end
  redis.call('HSET', K_ACCOUNT, 'seq', fmt(A.seq), 'x0', fmt(A.x0), 'lp', fmt(A.lp), 'hp', fmt(A.hp), 'xt', fmt(A.xt))
  -- Cards, status and profile (codec.py, StoredAccount): set, or removed when ''.
  local set, del = {}, {}
  for _, f in ipairs(sorted_keys(A.fields)) do
    local v = A.fields[f]
    if v == '' then del[#del + 1] = f else set[#set + 1] = f; set[#set + 1] = v end
  end
  if #set > 0 then call_batched('HSET', K_ACCOUNT, set) end
  if #del > 0 then call_batched('HDEL', K_ACCOUNT, del) end
  for _, seq in ipairs(sorted_keys(A.dirty_tx)) do
    redis.call('HSET', K_TX, fmt(seq), cmsgpack.pack(A.tx[seq]))
  end
  if #forget > 0 then call_batched('HDEL', K_TX, forget) end
  if #A.open_rem > 0 then call_batched('ZREM', K_OPEN, A.open_rem) end
  if #A.open_add > 0 then call_batched('ZADD', K_OPEN, A.open_add) end
  for _, h in ipairs(A.hold_add) do redis.call('ZADD', K_HOLDS, fmt(h[2]), h[1]) end
  if #A.hold_rem > 0 then call_batched('ZREM', K_HOLDS, A.hold_rem) end
  -- The stream entries (codec.py, "stream events"): the call's last event carries its
  -- idempotency record and expiry when finish() set them.
  for i, ev in ipairs(A.events) do
    if i == #A.events and A.record and ev.rid then
      redis.call('XADD', K_EVENTS, '*', 'e', cmsgpack.pack(ev), 'r', A.record, 'x', A.record_exp)
    else
      redis.call('XADD', K_EVENTS, '*', 'e', cmsgpack.pack(ev))
    end
  end
end

-- The answer: codec.py, OpResult.
local function finish(result)
  result.code = result.code or 'OK'
  local last = A.events[#A.events]
  if last then
    -- The balance after the last event is the balance now (see emit), computed once.
    result.available, result.held = last.available, last.held
  else
    result.available, result.held = available(), held()
  end
  local packed = cmsgpack.pack(result)
  -- The answer is packed before commit() (nothing commit writes changes it) so that the stream
  -- entry of the last event, or a refusal's note, carries the idempotency record and the Unix ms
  -- it expires at: the write-behind copies it from there, not with a GET and PTTL per event.
  if K_IDEM then
    A.record = FINGERPRINT .. packed
    A.record_exp = IDEM_EXP
    redis.call('SET', K_IDEM, A.record, 'PXAT', A.record_exp)  -- expires exactly when the entry says
  end
  if result.code == 'OK' then commit() end
  if A.record and ARGS.rid and (result.code ~= 'OK' or #A.events == 0) then
    -- A refusal (or a success that changed nothing: blocking a blocked card) has no event; this
    -- entry tells the write-behind to keep its record durable too (codec.py, IdempotencyNote).
    redis.call('XADD', K_EVENTS, '*', 'i', cmsgpack.pack({account = ACCOUNT, rid = ARGS.rid}),
      'r', A.record, 'x', A.record_exp)
  end
  return packed
end

local function refuse(code, reason, message, meta)
  return finish({code = code, reason = reason, message = message, meta = meta})
end

local function insufficient(wanted)
  local avail = available()
  return refuse('FAILED_PRECONDITION', 'INSUFFICIENT_POINTS',
    'the account has ' .. fmt(avail) .. ' points available, ' .. fmt(wanted) .. ' were asked for',
    {available_points = fmt(avail), requested_points = fmt(wanted)})
end

-- Every path that adds points (earn, grant, refund of a use) keeps available + held within
-- MAX_BALANCE. Voids and hold expiries only move points from held back to available.
local function over_cap(adding)
  return available() + held() + adding > MAX_BALANCE
end

local function balance_limit()
  return refuse('FAILED_PRECONDITION', 'BALANCE_LIMIT_EXCEEDED',
    'the balance would exceed ' .. fmt(MAX_BALANCE) .. ' points', {max_balance_points = fmt(MAX_BALANCE)})
end

local function event_base(type_, extra)
  extra.type = type_
  extra.rid = ARGS.rid
  extra.pos = ARGS.pos
  return extra
end

-- The record of the transaction event `ev` made: codec.py, TransactionRecord. One shape: every
-- field in every record, `fields` setting those of its type. The balance is the event's (the
-- receipt's balance after it), and the journal builds the same record from the event alone.
local function new_tx(type_, ev, fields)
  local rec = {type = type_, time = NOW, pos = ARGS.pos, pts = ev.pts, refunded = 0,
    available = ev.available, held = ev.held, lots = ev.lots, alloc = {}, ref = ev.ref or 0,
    state = '', exp = 0, captured = 0, released = 0, capture = 0, amount = ev.amount or 0, racct = ev.racct or '',
    lines = ev.lines or {}, qual = 0, rp = 0}
  for k, v in pairs(fields) do rec[k] = v end
  return rec
end

local OPS = {}

-- Cards: a field c:<card number> per card of the account, "<state><kind>[<link ms>[:<state
-- ms>[:<replaced by>]]]" (codec.py, CardLink); "1", of accounts opened before cards had states,
-- is an active physical card.
local CARD_STATES = {A = 'ACTIVE', B = 'BLOCKED', R = 'REPLACED', ['1'] = 'ACTIVE'}

local function parse_card(v)
  if v == '1' then return {state = 'A', kind = 'P'} end
  local link, state_ms, by = string.match(string.sub(v, 3), '^(%d*):?(%d*):?(.*)$')
  return {state = string.sub(v, 1, 1), kind = string.sub(v, 2, 2), link = tonumber(link),
    state_ms = tonumber(state_ms), by = by ~= '' and by or nil}
end

local function card_text(c)
  local t = c.state .. c.kind .. (c.link and fmt(c.link) or '')
  if c.state_ms or c.by then t = t .. ':' .. (c.state_ms and fmt(c.state_ms) or '') end
  if c.by then t = t .. ':' .. c.by end
  return t
end

local function open_holds()
  return refuse('FAILED_PRECONDITION', 'ACCOUNT_HAS_OPEN_HOLDS', 'account ' .. ACCOUNT .. ' has '
    .. fmt(held()) .. ' points on hold: capture or void them first', {held_points = fmt(held())})
end

local function card_blocked(card, c)
  return refuse('FAILED_PRECONDITION', 'CARD_BLOCKED', 'card ' .. card .. ' is ' .. string.lower(CARD_STATES[c.state]),
    {card_state = CARD_STATES[c.state], replaced_by_card_number = c.by})
end

-- The card named in ARGS.card, stored on this account, or a refusal.
local function own_card()
  local raw = redis.call('HGET', K_ACCOUNT, 'c:' .. ARGS.card)
  if not raw then
    return nil, refuse('NOT_FOUND', 'CARD_NOT_FOUND', 'account ' .. ACCOUNT .. ' has no card ' .. ARGS.card)
  end
  return parse_card(raw)
end

local function card_taken(card)
  return refuse('ALREADY_EXISTS', 'CARD_ALREADY_LINKED', 'card ' .. card .. ' is linked to account ' .. ACCOUNT,
    {account_id = ACCOUNT})
end

-- The member's profile: bd (birthday "MMDD"), jt (joined, ms), hc (home company), a:<key>
-- (attributes). ARGS.prof = {bd, jt, hc} sets those given ('' removes one); ARGS.aset sets
-- attributes, ARGS.adel removes them, ARGS.aclear removes all the others first.
local function set_profile()
  local prof = ARGS.prof or {}
  for _, f in ipairs({'bd', 'jt', 'hc'}) do
    if prof[f] ~= nil then A.fields[f] = type(prof[f]) == 'number' and fmt(prof[f]) or prof[f] end
  end
  if ARGS.aclear then
    local raw = redis.call('HGETALL', K_ACCOUNT)
    for i = 1, #raw, 2 do
      if string.sub(raw[i], 1, 2) == 'a:' then A.fields[raw[i]] = '' end
    end
  end
  for _, k in ipairs(ARGS.adel or {}) do A.fields['a:' .. k] = '' end
  for k, v in pairs(ARGS.aset or {}) do A.fields['a:' .. k] = v end
end

-- The profile as it is after this call's changes, for the event (codec.py, Profile).
local function profile_now()
  local raw = redis.call('HGETALL', K_ACCOUNT)
  local stored = {}
  for i = 1, #raw, 2 do stored[raw[i]] = raw[i + 1] end
  for f, v in pairs(A.fields) do stored[f] = v end
  local p, attrs, any = {}, {}, false
  for f, v in pairs(stored) do
    if v ~= '' then
      if f == 'bd' or f == 'hc' then p[f] = v
      elseif f == 'jt' then p.jt = tonumber(v)
      elseif string.sub(f, 1, 2) == 'a:' then attrs[string.sub(f, 3)] = v; any = true end
    end
  end
  if any then p.attrs = attrs end
  if next(p) == nil then return nil end -- cmsgpack would pack {} as an array
  return p
end

function OPS.create_account()
  if A.exists then
    return refuse('ALREADY_EXISTS', 'ACCOUNT_ALREADY_EXISTS', 'account ' .. ACCOUNT .. ' already exists')
  end
  A.fields['c:' .. ARGS.card] = card_text({state = 'A', kind = ARGS.kind, link = NOW})
  A.fields.ot = fmt(NOW)
  set_profile()
  if not A.fields.jt then A.fields.jt = fmt(NOW) end
  emit(event_base('ACCOUNT_OPENED', {card = ARGS.card, kind = ARGS.kind, pts = 0, lots = {},
    profile = profile_now()}))
  return finish({})
end

-- The card index (another slot) was claimed for this account before this call; the server
-- gives the claim back if this refuses.
function OPS.link_card()
  if redis.call('HEXISTS', K_ACCOUNT, 'c:' .. ARGS.card) == 1 then return card_taken(ARGS.card) end
  local text = card_text({state = 'A', kind = ARGS.kind, link = NOW})
  A.fields['c:' .. ARGS.card] = text
  emit(event_base('CARD_LINKED', {card = ARGS.card, kind = ARGS.kind, pts = 0, lots = {}}))
  return finish({card = text})
end

-- The server releases the card index's entry after this succeeds.
function OPS.unlink_card()
  local _, refusal = own_card()
  if refusal then return refusal end
  A.fields['c:' .. ARGS.card] = ''
  emit(event_base('CARD_UNLINKED', {card = ARGS.card, pts = 0, lots = {}}))
  return finish({})
end

-- ARGS.state: 'B' blocks, 'A' unblocks. A card already in that state changes nothing.
function OPS.card_state()
  local c, refusal = own_card()
  if not c then return refusal end
  if c.state == 'R' and ARGS.state == 'A' then return card_blocked(ARGS.card, c) end
  if c.state == ARGS.state or (c.state == 'R' and ARGS.state == 'B') then
    return finish({card = card_text(c)})
  end
  c.state, c.state_ms = ARGS.state, NOW
  A.fields['c:' .. ARGS.card] = card_text(c)
  emit(event_base(ARGS.state == 'B' and 'CARD_BLOCKED' or 'CARD_UNBLOCKED', {card = ARGS.card, pts = 0, lots = {}}))
  return finish({card = card_text(c)})
end

-- The old card becomes REPLACED, naming the new one, which is linked active (its index entry
-- was claimed before this call, as for link_card).
function OPS.reissue()
  local c, refusal = own_card()
  if not c then return refusal end
  if c.state == 'R' then return card_blocked(ARGS.card, c) end
  if redis.call('HEXISTS', K_ACCOUNT, 'c:' .. ARGS.new) == 1 then return card_taken(ARGS.new) end
  c.state, c.state_ms, c.by = 'R', NOW, ARGS.new
  local new = {state = 'A', kind = ARGS.kind, link = NOW}
  A.fields['c:' .. ARGS.card] = card_text(c)
  A.fields['c:' .. ARGS.new] = card_text(new)
  emit(event_base('CARD_REISSUED', {card = ARGS.card, new_card = ARGS.new, kind = ARGS.kind, pts = 0, lots = {}}))
  return finish({card = card_text(c), new_card = card_text(new)})
end

-- Its answer is the account hash as the update leaves it (as OPS.account's), so that a retry
-- gets the account as the first answer showed it.
function OPS.update_profile()
  set_profile()
  emit(event_base('PROFILE_UPDATED', {pts = 0, lots = {}, profile = profile_now()}))
  local raw = redis.call('HGETALL', K_ACCOUNT)
  local fields = {}
  for i = 1, #raw, 2 do fields[raw[i]] = raw[i + 1] end
  for f, v in pairs(A.fields) do fields[f] = v ~= '' and v or nil end
  fields.seq = fmt(A.seq)
  return finish({fields = fields})
end

-- Closing forfeits every lot's points (breakage of their issuers); refused while holds are open.
function OPS.close()
  if held() > 0 then return open_holds() end
  local raw = redis.call('ZRANGEBYSCORE', K_LOTS, '(' .. fmt(lot_score(NOW, 'R')), '+inf', 'WITHSCORES')
  local gone, total = {}, 0
  for i = 1, #raw, 2 do
    local l = read_lot(raw[i], raw[i + 1])
    if l.pts > 0 then
      gone[#gone + 1] = {l.id, -l.pts, l.exp, l.kind, l.iss}
      total = total + l.pts
      add_pts(l, -l.pts)
    end
  end
  A.fields.st, A.fields.ct = 'C', fmt(NOW)
  emit(event_base('ACCOUNT_CLOSED', {pts = total, lots = gone}))
  return finish({pts = total, lots = gone})
end

-- A coupon field q:<id> = "<campaign>|<issued>|<valid before>|<used>" as an event carries it
-- (codec.py, CouponEntry).
local function coupon_entry(id, raw)
  local rule, issued, untl, used = string.match(raw, '^(.*)|(%d+)|(%d+)|(%d+)$')
  return {id, rule, tonumber(issued), tonumber(untl), tonumber(used)}
end

-- Merge, step 1, on the source: closes it as MERGED into ARGS.target and records the move (its
-- lots with their expiry, kind and issuer, its cards, its coupons, the refund state of
-- transactions merged into it) in its transactions hash's field "m" (codec.py, MergeMove) and the shard's merges
-- set, both in this slot, so a crash before step 2 loses nothing: the recovery pass finishes it.
-- Refused while holds are open: a till mid-sale keeps its hold (capture or void it first).
function OPS.merge_out()
  if held() > 0 then return open_holds() end
  local raw = redis.call('ZRANGEBYSCORE', K_LOTS, '(' .. fmt(lot_score(NOW, 'R')), '+inf', 'WITHSCORES')
  local moved, gone, total = {}, {}, 0
  for i = 1, #raw, 2 do
    local l = read_lot(raw[i], raw[i + 1])
    if l.pts > 0 then
      moved[#moved + 1] = {l.id, l.pts, l.exp, l.kind, l.iss}
      gone[#gone + 1] = {l.id, -l.pts, l.exp, l.kind, l.iss}
      total = total + l.pts
      add_pts(l, -l.pts)
    end
  end
  local cards, card_list, foreign, counts, visited, coupons = {}, {}, {}, {}, {}, {}
  local fields = redis.call('HGETALL', K_ACCOUNT)
  for i = 1, #fields, 2 do
    local f, prefix = fields[i], string.sub(fields[i], 1, 2)
    if prefix == 'c:' then
      cards[string.sub(f, 3)] = fields[i + 1]
      card_list[#card_list + 1] = string.sub(f, 3)
      A.fields[f] = ''
    elseif prefix == 'f:' then
      foreign[string.sub(f, 3)] = fields[i + 1]
      A.fields[f] = ''
    elseif prefix == 'k:' then
      counts[string.sub(f, 3)] = fields[i + 1]
    elseif prefix == 'v:' then
      visited[string.sub(f, 3)] = fields[i + 1]
    elseif prefix == 'q:' then
      -- The member's coupons go with the move, as the cards do (used or not: the record stays).
      coupons[string.sub(f, 3)] = fields[i + 1]
      A.fields[f] = ''
    end
  end
  table.sort(card_list)
  A.fields.st, A.fields.mt, A.fields.mi, A.fields.mg = 'M', ARGS.target, ARGS.merge, fmt(NOW)
  local move = {merge = ARGS.merge, source = ACCOUNT, target = ARGS.target, time = NOW, lots = moved, cards = cards}
  if next(foreign) then move.foreign = foreign end
  -- The member is one: what the rules counted for the source counts for the target.
  if next(counts) then move.counts = counts end
  if next(visited) then move.visits = visited end
  if next(coupons) then move.coupons = coupons end
  move.earned = redis.call('HEXISTS', K_ACCOUNT, 'fe') == 1
  redis.call('HSET', K_TX, 'm', cmsgpack.pack(move))
  redis.call('ZADD', K_MERGES, fmt(NOW), ACCOUNT)
  -- `links`, `foreign`, `coupons`: the move's cards, refund states and coupons, for the journal
  -- (absent when empty: cmsgpack packs an empty table as an array).
  local left
  for _, id in ipairs(sorted_keys(coupons)) do
    left = left or {}
    left[#left + 1] = coupon_entry(id, coupons[id])
  end
  emit(event_base('MERGED_OUT', {pts = total, lots = gone, moved = moved, target = ARGS.target, merge = ARGS.merge,
    cards = card_list, actor = ARGS.actor, why = ARGS.why, links = next(cards) and cards or nil,
    foreign = next(foreign) and foreign or nil, coupons = left}))
  return finish({pts = total, lots = moved, cards = card_list})
end

-- Merge, step 2, on the target: applies the move once (the field mh:<merge id>, which also
-- lists the account's merge history, says it was). Each lot joins the lot of its expiry, kind
-- and issuer here, or becomes a new one; the cards come with their states. Never refused but
-- for a target itself merged since (the server follows): the points are already on their way.
function OPS.merge_in()
  if redis.call('HEXISTS', K_ACCOUNT, 'mh:' .. ARGS.merge) == 1 then return finish({}) end
  -- Merged itself since (and not this merge's target before): the points follow it.
  if A.status == 'M' then return merged_into(A.merged_into) end
  local lots, total = {}, 0
  for i, m in ipairs(ARGS.lots) do
    local l = find_lot(nil, m[3], m[4], m[5]) or new_lot(fresh_lot_id(), m[3], m[4], m[5])
    add_pts(l, m[2])
    lots[i] = {l.id, m[2], m[3], m[4], m[5]}
    total = total + m[2]
  end
  local links, card_list = ARGS.cards or {}, {}
  for card, v in pairs(links) do
    A.fields['c:' .. card] = v
    card_list[#card_list + 1] = card
  end
  table.sort(card_list)
  for txid, state in pairs(ARGS.foreign or {}) do A.fields['f:' .. txid] = state end
  local counts, first
  for rule, n in pairs(ARGS.counts or {}) do
    counts = counts or {}
    counts[rule] = tonumber(redis.call('HGET', K_ACCOUNT, 'k:' .. rule) or '0') + tonumber(n)
    A.fields['k:' .. rule] = fmt(counts[rule])
  end
  -- A visit rule's limit holds for the member: the later of the two days.
  local visits
  for key, day in pairs(ARGS.visits or {}) do
    local here = redis.call('HGET', K_ACCOUNT, 'v:' .. key)
    if not here or tonumber(here) < tonumber(day) then
      A.fields['v:' .. key] = day
      visits = visits or {}
      visits[key] = tonumber(day)
    end
  end
  -- The coupons keep their ids: each names the account and earn that issued it, so no other
  -- account's can be the same. `coupons`: each as it landed, for the journal.
  local coupons
  for _, id in ipairs(sorted_keys(ARGS.coupons or {})) do
    A.fields['q:' .. id] = ARGS.coupons[id]
    coupons = coupons or {}
    coupons[#coupons + 1] = coupon_entry(id, ARGS.coupons[id])
  end
  if ARGS.earned and redis.call('HEXISTS', K_ACCOUNT, 'fe') == 0 then
    A.fields.fe, first = fmt(NOW), true
  end
  A.fields['mh:' .. ARGS.merge] = ARGS.source .. '|' .. fmt(NOW)
  emit(event_base('MERGED_IN', {pts = total, lots = lots, source = ARGS.source, merge = ARGS.merge,
    counts = counts, first = first, visits = visits, coupons = coupons, cards = card_list,
    links = next(links) and links or nil}))
  return finish({pts = total, lots = lots})
end

-- GetAccount: the balance and the account hash (profile, cards, status) as one read.
function OPS.account()
  if #A.events > 0 then commit() end
  local raw = redis.call('HGETALL', K_ACCOUNT)
  local fields = {}
  for i = 1, #raw, 2 do fields[raw[i]] = raw[i + 1] end
  return cmsgpack.pack({code = 'OK', available = available(), held = held(), fields = fields})
end

-- What the receipt lines (rules/receipt.py) print besides the answer, when asked (ARGS.soon: a
-- horizon in ms): the lots expiring within it (at most 10, soonest first), the member's
-- birthday ("MMDD"), rank and qualifying spend, as this call leaves them.
local function receipt_facts(result)
  if not ARGS.soon then return result end
  flush_lots()
  local raw = redis.call('ZRANGEBYSCORE', K_LOTS, fmt(lot_score(NOW, 'R') + 1), fmt(lot_score(NOW + ARGS.soon, 'R')),
    'WITHSCORES', 'LIMIT', '0', '10')
  local soon = {}
  for i = 1, #raw, 2 do soon[#soon + 1] = parse_lot(raw[i], raw[i + 1]) end
  if #soon > 0 then result.soon = soon end
  local f = redis.call('HMGET', K_ACCOUNT, 'bd', 'rk', 'rs')
  result.now = NOW
  result.bd = f[1] or nil
  result.rank = result.rank or A.fields.rk or f[2] or nil
  result.spend = tonumber(A.fields.rs or f[3] or '0')
  return result
end

-- Member ranks (ARGS.ranks = {t = tiers {{rank id, min spend}, ...} lowest first, p = the
-- current period's index, d = 'one_step' or 'to_spend'; rules/engine.py's RankProgram): the
-- account hash keeps the rank (rk), the qualifying spend (rs) and the period it is of (rp).
local function rank_state()
  local raw = redis.call('HMGET', K_ACCOUNT, 'rk', 'rs', 'rp')
  return {rank = raw[1] or '', spend = tonumber(raw[2] or '0'), period = tonumber(raw[3] or '-1')}
end

local function tier_of(tiers, id)
  for i, t in ipairs(tiers) do
    if t[1] == id then return i end
  end
  return 0
end

local function supported(tiers, spend)
  local best = 1
  for i, t in ipairs(tiers) do
    if spend >= t[2] then best = i end
  end
  return best
end

-- A period's review, if a period has begun since the member's last: down one rank if the spend
-- of the period that ended fell short of theirs ('one_step'), or to the rank it supports
-- ('to_spend'), never up; the spend starts again at 0. A member with no rank (or one the
-- program no longer has) starts at the lowest. Emits RANK_REVIEWED whenever it reviews, the
-- rank kept or not (rank = {from, to}, from '' for a member without one; spend: the period that
-- ended; period: the new one): the journal copies the account's rk, rs and rp from the events.
local function review_rank(R, st)
  if st.period == R.p then return end
  local tiers, cur = R.t, tier_of(R.t, st.rank)
  local spent = st.period == R.p - 1 and st.spend or 0 -- a period without purchases spent 0
  local new = cur
  if cur == 0 then
    new = 1
  elseif R.d == 'to_spend' then
    new = math.min(cur, supported(tiers, spent))
  elseif spent < tiers[cur][2] then
    new = math.max(cur - 1, 1)
  end
  local from = st.rank
  st.rank, st.spend, st.period = tiers[new][1], 0, R.p
  A.fields.rk, A.fields.rs, A.fields.rp = st.rank, '0', fmt(R.p)
  emit({type = 'RANK_REVIEWED', pts = 0, lots = {}, rank = {from, st.rank}, spend = spent, period = R.p})
end

-- A coupon of the member's used at a sale, once, within its validity (q:<ARGS.coupon>).
function OPS.use_coupon()
  local raw = redis.call('HGET', K_ACCOUNT, 'q:' .. ARGS.coupon)
  if not raw then
    return refuse('NOT_FOUND', 'COUPON_NOT_FOUND', 'account ' .. ACCOUNT .. ' has no coupon ' .. ARGS.coupon)
  end
  local rule, issued, untl, used = string.match(raw, '^(.*)|(%d+)|(%d+)|(%d+)$')
  if tonumber(used) > 0 then
    return refuse('FAILED_PRECONDITION', 'COUPON_ALREADY_USED', 'coupon ' .. ARGS.coupon .. ' was used already',
      {used_at = used})
  end
  if tonumber(untl) <= NOW then
    return refuse('FAILED_PRECONDITION', 'COUPON_EXPIRED', 'coupon ' .. ARGS.coupon .. ' has expired')
  end
  A.fields['q:' .. ARGS.coupon] = rule .. '|' .. issued .. '|' .. untl .. '|' .. fmt(NOW)
  local coupon = {ARGS.coupon, rule, tonumber(issued), tonumber(untl), NOW}
  emit(event_base('COUPON_USED', {pts = 0, lots = {}, coupons = {coupon}}))
  return finish({coupons = {coupon}})
end

function OPS.rank_review()
  local st = rank_state()
  local was = st.rank
  review_rank(ARGS.ranks, st)
  return finish({rank = st.rank, was = was})
end

-- EARN and GRANT: points into the lot of their expiry, kind and issuer; a new lot, whose id is
-- the transaction's sequence number, if the account has none.
-- An earn under the rules (ARGS.lines, rules/engine.py's EarnLine: {r = rule, p = points, e =
-- expiry, k = kind, bm = birth month guard, fp = first-purchase guard, cap = per-member cap})
-- gives each line's points into its own lot, after what only the account can decide, atomically
-- with the balance: the member's guards (birthday month, first purchase) and the per-member cap
-- (field k:<rule>, the points the rule has given the member so far). The event and the record
-- keep each line (codec.py, EarnLineEntry) so that a refund can take back each rule's share.
-- The earn itself: the answer's fields, or a refusal already packed (a string).
local function earn_body()
  local lines = ARGS.lines or {{r = '', p = ARGS.pts, e = ARGS.exp, k = ARGS.kind}}
  local first = ARGS.type == 'EARN' and redis.call('HEXISTS', K_ACCOUNT, 'fe') == 0
  -- The rank first: a purchase whose spend reaches a rank earns at it. (Written only if the earn
  -- is not refused: refusals write nothing but their record.)
  local rank, upgraded
  if ARGS.ranks then
    rank = rank_state()
    review_rank(ARGS.ranks, rank)
    rank.spend = rank.spend + ARGS.qual
    local up = supported(ARGS.ranks.t, rank.spend)
    if up > tier_of(ARGS.ranks.t, rank.rank) then
      upgraded = {rank.rank, ARGS.ranks.t[up][1]}
      rank.rank = ARGS.ranks.t[up][1]
    end
  end
  local birthday
  local granted, notes, used, total = {}, {}, {}, 0
  for i, l in ipairs(lines) do
    local p = l.p
    if l.rk and #l.rk > 0 then
      local member_of = false
      for _, id in ipairs(l.rk) do member_of = member_of or (rank and id == rank.rank) end
      if not member_of then p, notes[i] = 0, 'not_rank' end
    end
    if l.bm and l.bm > 0 then
      birthday = birthday or redis.call('HGET', K_ACCOUNT, 'bd') or ''
      if tonumber(string.sub(birthday, 1, 2)) ~= l.bm then p, notes[i] = 0, 'not_birthday_month' end
    end
    if l.fp and not first then p, notes[i] = 0, 'not_first_purchase' end
    -- A visit rule's limit: the day (ARGS.day) it last gave points for its key (v:<key>).
    if l.lim and p > 0 and tonumber(redis.call('HGET', K_ACCOUNT, 'v:' .. l.lim) or '-1') >= ARGS.day then
      p, notes[i] = 0, 'already_checked_in' -- that day, or a later one (no back-dated second visit)
    end
    if p > 0 and l.cap and l.cap > 0 then
      used[i] = tonumber(redis.call('HGET', K_ACCOUNT, 'k:' .. l.r) or '0')
      if p > l.cap - used[i] then p, notes[i] = math.max(l.cap - used[i], 0), 'member_cap' end
    end
    if l.short and not notes[i] then notes[i] = 'budget' end -- its budget gave fewer than it says
    if p > 0 and l.e <= NOW and not l.cq then
      return refuse('FAILED_PRECONDITION', 'LOT_ALREADY_EXPIRED', 'the new lot would already be expired')
    end
    granted[i] = p
    if not l.cq then total = total + p end
  end
  if ARGS.type == 'VISIT' and total == 0 then
    local given = {}
    for i, l in ipairs(lines) do
      if notes[i] == 'already_checked_in' then given[#given + 1] = l.r end
    end
    if #given > 0 then
      return refuse('FAILED_PRECONDITION', 'ALREADY_CHECKED_IN', 'this visit has given its points already',
        {rule_ids = table.concat(given, ',')})
    end
    return refuse('FAILED_PRECONDITION', 'NO_VISIT_RULE', 'no visit rule gives this member points for this visit')
  end
  if over_cap(total) then return balance_limit() end
  local iss = ARGS.pos[1]
  local lots, out, counts, visits = {}, {}, nil, nil
  local coupons
  for i, l in ipairs(lines) do
    local lot_id = 0
    if l.cq then
      -- A coupon campaign's line issues one coupon (q:<id> = "<rule>|<issued>|<until>|<used>",
      -- codec.py, CouponEntry), valid until the line's expiry; it gives no points.
      if granted[i] > 0 then
        local id = ACCOUNT .. '.' .. fmt(A.seq + 1) .. '.' .. fmt(i) -- unique in the group
        A.fields['q:' .. id] = l.r .. '|' .. fmt(NOW) .. '|' .. fmt(l.e) .. '|0'
        coupons = coupons or {}
        coupons[#coupons + 1] = {id, l.r, NOW, l.e, 0}
        if used[i] then
          counts = counts or {}
          counts[l.r] = used[i] + 1
          A.fields['k:' .. l.r] = fmt(counts[l.r])
        end
      end
      granted[i] = 0
    elseif granted[i] > 0 then
      local lot = find_lot(nil, l.e, l.k, iss) or new_lot(fresh_lot_id(), l.e, l.k, iss)
      add_pts(lot, granted[i])
      lots[#lots + 1] = {lot.id, granted[i], l.e, l.k, iss}
      lot_id = lot.id
      if l.lim then
        visits = visits or {}
        visits[l.lim] = ARGS.day
        A.fields['v:' .. l.lim] = fmt(ARGS.day)
      end
      if used[i] then
        counts = counts or {}
        counts[l.r] = used[i] + granted[i]
        A.fields['k:' .. l.r] = fmt(counts[l.r])
      end
    end
    out[i] = {l.r, granted[i], lot_id, notes[i] or '', 0, l.b and 1 or 0}
  end
  if first then A.fields.fe = fmt(NOW) end
  if rank then A.fields.rk, A.fields.rs = rank.rank, fmt(rank.spend) end
  -- `counts`: the capped rules' counts after the earn; `first`: the member's first earn; `rank`:
  -- [from, to] when the earn's spend reached a higher rank; `spend`: the period's spend after it,
  -- `period` that period and `qual` the earn's qualifying amount (its record's rp and qual).
  local ev = event_base(ARGS.type, {pts = total, lots = lots, amount = ARGS.amount, ptime = ARGS.ptime,
    lines = ARGS.lines and out or nil, rules = ARGS.rules, counts = counts, first = first or nil, coupons = coupons,
    rank = upgraded, spend = rank and rank.spend or nil, period = rank and rank.period or nil,
    qual = rank and ARGS.qual or nil, visits = visits})
  local seq = emit(ev)
  -- The record keeps the qualifying amount and its period, for a refund to lower the spend.
  tx_put(seq, new_tx(ARGS.type, ev, rank and {qual = ARGS.qual, rp = rank.period} or {}))
  return {tx = seq, pts = total, lots = lots, lines = ARGS.lines and out or nil, rules = ARGS.rules,
    coupons = coupons, rank = rank and rank.rank or nil, up = upgraded and true or nil}
end

function OPS.earn()
  local result = earn_body()
  if type(result) == 'string' then return result end
  return finish(receipt_facts(result))
end

function OPS.authorize()
  local pts = ARGS.pts
  if available() < pts then return insufficient(pts) end
  local alloc = take(pts)
  local exp = NOW + ARGS.ttl
  local seq = A.seq + 1 -- the hold is held before its event, whose balance counts it
  add_hold(seq, pts, exp)
  local ev = event_base('HOLD_AUTHORIZED', {pts = pts, lots = effects(alloc, -1), alloc = alloc, hold_exp = exp})
  emit(ev)
  tx_put(seq, new_tx('HOLD', ev, {alloc = alloc, state = 'HELD', exp = exp}))
  return finish({tx = seq, pts = pts, exp = exp})
end

-- The hold named by ARGS.hold, or a refusal saying why it cannot be resolved now.
local function open_hold()
  local rec = tx_get(ARGS.hold)
  if not rec or rec.type ~= 'HOLD' then
    return nil, refuse('NOT_FOUND', 'HOLD_NOT_FOUND', 'no hold ' .. ACCOUNT .. '.' .. fmt(ARGS.hold))
  end
  if rec.state == 'HELD' then
    ARGS.pos = rec.pos -- the capture or void happens at the till that took the hold
    return rec
  end
  local reasons = {CAPTURED = 'HOLD_ALREADY_CAPTURED', VOIDED = 'HOLD_ALREADY_VOIDED', EXPIRED = 'HOLD_EXPIRED'}
  return nil, refuse('FAILED_PRECONDITION', reasons[rec.state], 'the hold is ' .. string.lower(rec.state))
end

function OPS.capture()
  local rec, refusal = open_hold()
  if not rec then return refusal end
  local want = ARGS.pts
  if want < 0 then want = rec.pts end
  if want > rec.pts then
    return refuse('FAILED_PRECONDITION', 'CAPTURE_EXCEEDS_HOLD',
      'capture of ' .. fmt(want) .. ' points exceeds the hold of ' .. fmt(rec.pts),
      {held_points = fmt(rec.pts), requested_points = fmt(want)})
  end
  -- The capture spends the hold's allocation in its spending order; the rest goes back.
  local used, released, rest = {}, {}, want
  for _, e in ipairs(rec.alloc) do
    local n = math.min(e[2], rest)
    rest = rest - n
    if n > 0 then used[#used + 1] = {e[1], n, e[3], e[4], e[5], 0} end
    if e[2] > n then released[#released + 1] = give_back(e, e[2] - n) end
  end
  local released_pts = rec.pts - want
  drop_hold(ARGS.hold, rec.pts)
  -- `lots`: what went back to the lots; `spent`: the capture's own effects, what it used.
  local spent = effects(used, -1)
  local ev = event_base('HOLD_CAPTURED', {pts = want, released = released_pts, ref = ARGS.hold,
    lots = released, alloc = used, spent = spent})
  local seq = emit(ev)
  rec.state, rec.captured, rec.released, rec.capture = 'CAPTURED', want, released_pts, seq
  tx_put(ARGS.hold, rec)
  tx_put(seq, new_tx('CAPTURE', ev, {alloc = used, lots = spent}))
  local result = {tx = seq, pts = want, released = released_pts}
  -- A capture that completes a sale may earn for it in the same call (ARGS.lines: as an earn's,
  -- at the hold's point of sale): one EARN event after the capture's, under the same request.
  if ARGS.lines then
    ARGS.type = 'EARN'
    local earned = earn_body()
    if type(earned) == 'string' then return earned end
    result.etx, result.epts, result.lots, result.lines = earned.tx, earned.pts, earned.lots, earned.lines
    result.coupons, result.rank, result.up, result.rules = earned.coupons, earned.rank, earned.up, earned.rules
  end
  return finish(receipt_facts(result))
end

function OPS.void()
  local rec, refusal = open_hold()
  if not rec then return refusal end
  local lots = {}
  for i, e in ipairs(rec.alloc) do lots[i] = give_back(e, e[2]) end
  drop_hold(ARGS.hold, rec.pts)
  emit(event_base('HOLD_VOIDED', {pts = rec.pts, ref = ARGS.hold, lots = lots}))
  rec.state, rec.released = 'VOIDED', rec.pts
  tx_put(ARGS.hold, rec)
  return finish({tx = ARGS.hold, released = rec.pts})
end

function OPS.redeem()
  local pts = ARGS.pts
  if available() < pts then return insufficient(pts) end
  local alloc = take(pts)
  local lots = effects(alloc, -1)
  local ev = event_base('REDEEMED', {pts = pts, lots = lots, alloc = alloc})
  local seq = emit(ev)
  tx_put(seq, new_tx('REDEMPTION', ev, {alloc = alloc}))
  return finish({tx = seq, pts = pts, lots = lots})
end

-- An earn's refund takes points back (from its own lot first: the lot of its expiry, kind and
-- issuer, into which later earns of the same may have merged); a capture's or redemption's
-- gives them back to the lots they came from, the last-spent first.
-- A refund of an earn under the rules takes back each line's share of `want`: its points x
-- want / the earn's points, rounded down, then what is left of `want` to the lines in order
-- (the base line first), never more than a line has left. (Exact while a line's points times
-- `want` stay below 2^53; beyond, a share may be a point off, the total never.) Each share comes from the line's own lot first, then in spending order; a capped
-- rule's count (k:<rule>) goes down by its share, so the member can earn it again. Returns the
-- lot effects and the shares (codec.py, EarnLineEntry: rule, points, lot, "", 0), and updates
-- the lines' refunded points in `orig`.
local function refund_lines(orig, want)
  local shares, left, rest = {}, {}, want
  for i, l in ipairs(orig.lines) do
    left[i] = l[2] - l[5]
    shares[i] = math.min(left[i], math.floor(l[2] * want / orig.pts), rest)
    rest = rest - shares[i]
  end
  for i = 1, #orig.lines do
    if rest == 0 then break end
    local n = math.min(rest, left[i] - shares[i])
    shares[i] = shares[i] + n
    rest = rest - n
  end
  local lots, out = {}, {}
  for i, l in ipairs(orig.lines) do
    if shares[i] > 0 then
      local own = l.own -- a merged account's: its lot by expiry, kind and issuer
      for _, e in ipairs(orig.lots) do
        if e[1] and e[1] == l[3] then own = e end
      end
      for _, e in ipairs(effects(take(shares[i], own), -1)) do lots[#lots + 1] = e end
      l[5] = l[5] + shares[i]
      local count = l[1] ~= '' and redis.call('HGET', K_ACCOUNT, 'k:' .. l[1])
      if count then
        A.counts = A.counts or {}
        A.counts[l[1]] = math.max(tonumber(count) - shares[i], 0)
        A.fields['k:' .. l[1]] = fmt(A.counts[l[1]])
      end
      out[#out + 1] = {l[1], shares[i], l[3], '', 0, l[6] or 0}
    end
  end
  return lots, out
end

-- A refund of a transaction of an account merged into this one (ARGS.facct): the server passes
-- its record (BLOB, from the merged account, which never changes again); what has been
-- refunded of it is kept here, in the account hash's field f:<transaction id> = "<points
-- refunded>|<returned per allocation entry>|<refunded per rule line>", lists comma-separated
-- (codec.py, foreign_refund_state).
-- Its lot ids are the merged account's: points go back by expiry, kind and issuer, to the lot
-- this account keeps for them, or a new one.
local function foreign_original()
  local orig = cmsgpack.unpack(BLOB)
  local key = 'f:' .. ARGS.facct .. '.' .. fmt(ARGS.orig)
  local state = redis.call('HGET', K_ACCOUNT, key)
  if state then
    local refunded, returned, lines = string.match(state, '^(%d+)|([%d,]*)|?([%d,]*)$')
    orig.refunded = tonumber(refunded)
    local i = 0
    for r in string.gmatch(returned, '%d+') do
      i = i + 1
      orig.alloc[i][6] = tonumber(r)
    end
    i = 0
    for r in string.gmatch(lines, '%d+') do
      i = i + 1
      orig.lines[i][5] = tonumber(r)
    end
  end
  for _, l in ipairs(orig.lines or {}) do
    for _, e in ipairs(orig.lots) do
      if e[1] == l[3] then l.own = {false, e[2], e[3], e[4], e[5]} end
    end
  end
  for _, e in ipairs(orig.alloc) do e[1] = false end
  for _, e in ipairs(orig.lots) do e[1] = false end
  if orig.time <= NOW - TX_RETENTION then orig = nil end
  return orig, key
end

function OPS.refund()
  local orig, foreign
  if ARGS.facct then orig, foreign = foreign_original() else orig = tx_get(ARGS.orig) end
  local refundable = {EARN = true, GRANT = true, CAPTURE = true, REDEMPTION = true}
  if not orig or not refundable[orig.type] then
    return refuse('NOT_FOUND', 'TRANSACTION_NOT_FOUND',
      'no refundable transaction ' .. (ARGS.facct or ACCOUNT) .. '.' .. fmt(ARGS.orig))
  end
  ARGS.pos = ARGS.pos or orig.pos
  local remaining = orig.pts - orig.refunded
  local want = ARGS.pts
  if want < 0 then want = remaining end
  if want > remaining or want == 0 then
    return refuse('FAILED_PRECONDITION', 'REFUND_EXCEEDS_ORIGINAL',
      'refund of ' .. fmt(want) .. ' points exceeds the ' .. fmt(remaining) .. ' points left to refund',
      {refundable_points = fmt(remaining), requested_points = fmt(want)})
  end
  local lots, returned, shares
  if (orig.type == 'EARN' or orig.type == 'GRANT') and orig.lines and #orig.lines > 0 then
    if available() < want then return insufficient(want) end
    lots, shares = refund_lines(orig, want)
  elseif orig.type == 'EARN' or orig.type == 'GRANT' then
    if available() < want then return insufficient(want) end
    lots = effects(take(want, orig.lots[1]), -1)
  else
    -- Points given back count against the cap like any other points added.
    if over_cap(want) then return balance_limit() end
    -- Per lot given back: the allocation entry it counts against (from 0) and its total now.
    lots, returned = {}, {}
    local rest = want
    for i = #orig.alloc, 1, -1 do
      local e = orig.alloc[i]
      local n = math.min(e[2] - e[6], rest)
      if n > 0 then
        lots[#lots + 1] = give_back(e, n)
        e[6] = e[6] + n
        rest = rest - n
        returned[#returned + 1] = {i - 1, e[6]}
      end
    end
  end
  orig.refunded = orig.refunded + want
  -- A refund of an earn lowers the qualifying spend of the period it counted in, by its share
  -- of the purchase (rounded down); the rank itself waits for the review.
  local spend
  if ARGS.ranks and orig.qual and orig.qual > 0 and orig.pts > 0 then
    local st = rank_state()
    if st.period == orig.rp then
      spend = math.max(st.spend - math.floor(orig.qual * want / orig.pts), 0)
      A.fields.rs = fmt(spend)
    end
  end
  local ev = event_base('REFUNDED', {pts = want, ref = ARGS.orig, racct = ARGS.facct, lots = lots,
    refunded = orig.refunded, returned = returned, lines = shares, counts = A.counts, spend = spend})
  local seq = emit(ev)
  if foreign then
    local back, by_line = {}, {}
    for i, e in ipairs(orig.alloc) do back[i] = fmt(e[6]) end
    for i, l in ipairs(orig.lines or {}) do by_line[i] = fmt(l[5]) end
    local state = fmt(orig.refunded) .. '|' .. table.concat(back, ',')
    if #by_line > 0 then state = state .. '|' .. table.concat(by_line, ',') end
    A.fields[foreign] = state
  else
    tx_put(ARGS.orig, orig)
  end
  tx_put(seq, new_tx('REFUND', ev, {}))
  return finish({tx = seq, pts = want, lots = lots, lines = shares})
end

-- Balance inquiry; also what the sweeper calls to resolve expired holds. Writes only when
-- time has expired something. Its answer lists a page of the spendable lots (ARGS.limit, after
-- the lot ARGS.after = {score, id} if given): written first, the sorted set is the lots in
-- spending order, read with one range read from where the page starts, so a page costs the
-- same however many lots the account has.
function OPS.balance()
  if #A.events > 0 then commit() end
  local limit = ARGS.limit or 20
  local low, skip_score, skip_id = lot_score(NOW, 'R') + 1, nil, nil
  if ARGS.after and ARGS.after[1] >= low then
    low, skip_score, skip_id = ARGS.after[1], ARGS.after[1], ARGS.after[2]
  end
  -- Lots at the page's first score up to the previous page's last one are skipped: at most one
  -- per issuer (lots of one expiry, kind and issuer are one lot).
  local skip = skip_score and redis.call('ZCOUNT', K_LOTS, fmt(skip_score), fmt(skip_score)) or 0
  local raw = redis.call('ZRANGEBYSCORE', K_LOTS, fmt(low), '+inf', 'WITHSCORES', 'LIMIT', '0', fmt(limit + 1 + skip))
  -- The page goes back as the set stores it (member, score, ...): the server parses it
  -- (codec.decode_lot), so Redis spends no time on the lots it only passes on. On a first page
  -- (nothing to skip) that is the range read's reply itself, less the lot read past the page.
  local page = raw
  if skip > 0 then
    page = {}
    for i = 1, #raw, 2 do
      if not (tonumber(raw[i + 1]) == skip_score and parse_lot(raw[i], raw[i + 1])[1] <= skip_id) then
        page[#page + 1] = raw[i]
        page[#page + 1] = raw[i + 1]
      end
    end
  end
  local more = #page > 2 * limit
  for i = #page, 2 * limit + 1, -1 do page[i] = nil end
  return cmsgpack.pack({code = 'OK', page = page, more = more, available = available(), held = held()})
end

local AFTER_CLOSE = {account = true, unlink_card = true, capture = true, void = true, merge_in = true}
local AFTER_MERGE = {account = true, capture = true, void = true, merge_in = true}

local function ledger(KEYS, ARGV)
  OP, NOW, ACCOUNT = ARGV[1], tonumber(ARGV[2]), ARGV[3]
  FINGERPRINT, IDEM_EXP, TX_RETENTION = ARGV[4], ARGV[5], tonumber(ARGV[6])
  ARGS = cmsgpack.unpack(ARGV[7])
  -- Bytes to pass as they are (cmsgpack reads no msgpack bin): a refund's foreign record.
  BLOB = ARGV[8]
  K_ACCOUNT, K_TX, K_LOTS, K_OPEN = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
  K_HOLDS, K_EVENTS, K_MERGES, K_IDEM = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
  -- The company check (see CO_SCOPED), the replay check, the card check (see merged_into).
  NAMED_TX = {}
  if ARGS.co and CO_SCOPED[OP] then
    local seq = ARGS[CO_SCOPED[OP]]
    local rec
    if ARGS.facct then
      rec = cmsgpack.unpack(BLOB) -- a merged account's transaction: its record comes with the call
    else
      local raw = redis.call('HGET', K_TX, fmt(seq))
      rec = raw and cmsgpack.unpack(raw) or false
      NAMED_TX[seq] = rec
    end
    if rec and not (rec.pos and rec.pos[1] == ARGS.co) then
      if OP == 'refund' then
        return cmsgpack.pack({code = 'NOT_FOUND', reason = 'TRANSACTION_NOT_FOUND',
          message = 'no refundable transaction ' .. (ARGS.facct or ACCOUNT) .. '.' .. fmt(seq)})
      end
      return cmsgpack.pack({code = 'NOT_FOUND', reason = 'HOLD_NOT_FOUND', message = 'no hold ' .. ACCOUNT .. '.'
        .. fmt(seq)})
    end
  end

  -- Replay: same request id and fingerprint returns the stored result byte for byte.
  -- Idempotency record: "<fingerprint><packed result>" (codec.py, idempotency_record).
  if K_IDEM then
    local rec = redis.call('GET', K_IDEM)
    if rec then
      if string.sub(rec, 1, #FINGERPRINT) == FINGERPRINT then return string.sub(rec, #FINGERPRINT + 1) end
      return cmsgpack.pack({code = 'ALREADY_EXISTS', reason = 'IDEMPOTENCY_KEY_REUSED',
        message = 'request_id was already used for a different request'})
    end
  end

  A = {seq = 0, x0 = 1, lp = 0, hp = 0, xt = 0, expired = 0, lots = {}, buckets = {}, scores = {},
    dirty_lots = {}, events = {}, tx = NAMED_TX, dirty_tx = {}, open_add = {}, open_rem = {}, hold_add = {},
    hold_rem = {}, fields = {}, exists = false}

  load()
  if ARGS.via and not VIA_CARD then
    if A.status == 'M' then return merged_into(A.merged_into) end
    return cmsgpack.pack({code = 'NOT_FOUND', reason = 'CARD_NOT_FOUND', message = 'account ' .. ACCOUNT
      .. ' has no card ' .. ARGS.via})
  end
  if A.older_layout then
    return redis.error_reply('ERR account ' .. ACCOUNT .. ' is stored in an older layout: rebuild Redis from '
      .. 'PostgreSQL (pointauth rehydrate) before serving it')
  end
  if not A.exists and OP ~= 'create_account' then
    return cmsgpack.pack({code = 'NOT_FOUND', reason = 'ACCOUNT_NOT_FOUND', message = 'no account ' .. ACCOUNT})
  end
  -- A closed account does no new business: only reads, unlinking its cards and the sweeper's
  -- balance (no card) go on.
  -- A merged one sends everything else to its target (writing nothing); a merge may still land
  -- on a closed one (its step 1 ran before the closing), never lose its points.
  if A.status == 'C' and not AFTER_CLOSE[OP] and not (OP == 'balance' and not ARGS.via) then
    return refuse('FAILED_PRECONDITION', 'ACCOUNT_CLOSED', 'account ' .. ACCOUNT .. ' is closed')
  end
  if A.status == 'M' and not AFTER_MERGE[OP] and not (OP == 'balance' and not ARGS.via) then
    return merged_into(A.merged_into)
  end
  if VIA_CARD and not ARGS.any_state then
    local c = parse_card(VIA_CARD)
    if c.state ~= 'A' then return card_blocked(ARGS.via, c) end
  end
  expire()
  if A.more_expired then
    -- What time changed so far is written, with no idempotency record: the same call again
    -- (the same request id) releases the next holds, and once none is left over, runs its op.
    commit()
    return cmsgpack.pack({code = 'EXPIRY_CONTINUES', message = 'account ' .. ACCOUNT .. ' has more than '
      .. fmt(EXPIRE_PAGE) .. ' holds past their TTL; ' .. fmt(EXPIRE_PAGE) .. ' were released'})
  end
  return OPS[OP]()
end

-- Neither function is no-writes: balance writes too when time has expired something. Without
-- allow-cross-slot-keys, Redis Cluster refuses a call whose keys span slots.
redis.register_function{function_name = 'pointauth_ledger_$VERSION', callback = ledger}

-- Moves a card's index entry from one account to another only if it names the first (merges).
-- KEYS: card bucket. ARGV: card number, from account, to account.
redis.register_function{function_name = 'pointauth_move_card_$VERSION', callback = function(KEYS, ARGV)
  if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) end
  return 0
end}

-- A campaign's budget (KEYS[1]: the points it has given): reserves up to ARGV[1] points so that
-- the count never passes the budget ARGV[2]; returns the points reserved.
redis.register_function{function_name = 'pointauth_take_budget_$VERSION', callback = function(KEYS, ARGV)
  local spent, want, budget = tonumber(redis.call('GET', KEYS[1]) or '0'), tonumber(ARGV[1]), tonumber(ARGV[2])
  local take = math.max(math.min(want, budget - spent), 0)
  if take > 0 then redis.call('INCRBY', KEYS[1], take) end
  return take
end}

-- Gives back what an earn reserved and did not use, once per earn: KEYS[1] the budget, KEYS[2]
-- the earn's mark; ARGV: reserved, granted, the mark's TTL (s). A retried earn (its answer
-- replayed, granting nothing new) finds the mark and gives back all it reserved again.
redis.register_function{function_name = 'pointauth_settle_budget_$VERSION', callback = function(KEYS, ARGV)
  local back = tonumber(ARGV[1])
  if redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[3]) then back = back - tonumber(ARGV[2]) end
  back = math.min(back, tonumber(redis.call('GET', KEYS[1]) or '0'))
  if back > 0 then redis.call('DECRBY', KEYS[1], back) end
  return back
end}

-- Gives back ARGV[1] points with no earn to settle (a refused earn's reservation), or, with
-- KEYS[2] a refund's mark, a refunded earn's campaign points, once per refund.
redis.register_function{function_name = 'pointauth_give_budget_$VERSION', callback = function(KEYS, ARGV)
  if KEYS[2] and not redis.call('SET', KEYS[2], '1', 'NX', 'EX', ARGV[2]) then return 0 end
  local back = math.min(tonumber(ARGV[1]), tonumber(redis.call('GET', KEYS[1]) or '0'))
  if back > 0 then redis.call('DECRBY', KEYS[1], back) end
  return back
end}

-- Gives a card claim back only if it still names this account (compare and delete).
-- KEYS: card bucket. ARGV: card number, account id.
redis.register_function{function_name = 'pointauth_release_card_$VERSION', callback = function(KEYS, ARGV)
  if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
  return 0
end}
