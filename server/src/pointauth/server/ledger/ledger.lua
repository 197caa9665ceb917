#!lua name=pointauth_$VERSION
-- pointauth ledger: every state change of one account, atomically, in one function call.
-- A Redis Functions library; _ledger.py puts a hash of this file where the names say VERSION,
-- so each version has a library and functions of its own: servers of two releases share one
-- Redis during a rolling deploy without either replacing what the other calls.
--
-- KEYS (all in the account's hash slot):
--   1 account hash   fields: seq, x0, l:<lot id> = "pts:exp:kind:issuer", h:<hold seq> = "pts:exp"
--   2 transactions   hash: <seq> = msgpack record (for holds, refunds and receipts)
--   3 hold index     sorted set of the shard's open holds "<account>.<seq>" by expiry (sweeper)
--   4 events         the shard's stream, read by the write-behind worker
--   5 idempotency    string "<fingerprint><msgpack result>" (mutations only)
-- ARGV: op, now_ms, account_id, fingerprint, idempotency_ttl_s, tx_retention_ms, msgpack args
--
-- Shape of every call: replay check, load, expire what time has expired (in memory), validate,
-- and only then write. A refusal writes nothing but its idempotency record, so a retry gets
-- the same refusal even after the balance has changed. Points are Lua numbers (doubles):
-- exact because the server caps every amount and balance below 2^53.

-- The body is this callback's, unindented so that it reads (and diffs) as the script it was.
-- Everything is local to one call: nothing survives from one call to the next.
local function ledger(KEYS, ARGV)
local OP, NOW, ACCOUNT = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local FINGERPRINT, IDEM_TTL, TX_RETENTION = ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6])
local ARGS = cmsgpack.unpack(ARGV[7])
local K_ACCOUNT, K_TX, K_HOLDS, K_EVENTS, K_IDEM = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local MAX_BALANCE = 1000000000000000

local function fmt(n) return string.format('%d', n) end

local function split(s)
  local out = {}
  for part in string.gmatch(s, '[^:]+') do out[#out + 1] = part end
  return out
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

local A = {seq = 0, x0 = 1, lots = {}, holds = {}, events = {}, dirty_lots = {}, dirty_holds = {},
  tx = {}, dirty_tx = {}, hold_add = {}, hold_rem = {}, exists = false}

-- The account hash: codec.py, AccountHash (written in commit()).
local function load()
  local raw = redis.call('HGETALL', K_ACCOUNT)
  for i = 1, #raw, 2 do
    local f, v = raw[i], raw[i + 1]
    local tag = string.sub(f, 1, 2)
    if tag == 'l:' then
      local p = split(v)
      local id = tonumber(string.sub(f, 3))
      A.lots[id] = {id = id, pts = tonumber(p[1]), exp = tonumber(p[2]), kind = p[3], iss = p[4]}
    elseif tag == 'h:' then
      local p = split(v)
      A.holds[tonumber(string.sub(f, 3))] = {pts = tonumber(p[1]), exp = tonumber(p[2])}
    elseif f == 'seq' then A.seq = tonumber(v)
    elseif f == 'x0' then A.x0 = tonumber(v)
    end
  end
  A.exists = #raw > 0
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

local function sorted_keys(t)
  local keys = {}
  for k in pairs(t) do keys[#keys + 1] = k end
  table.sort(keys)
  return keys
end

local function available()
  local sum = 0
  for _, l in pairs(A.lots) do
    if l.exp > NOW then sum = sum + l.pts end
  end
  return sum
end

local function held()
  local sum = 0
  for _, h in pairs(A.holds) do sum = sum + h.pts end
  return sum
end

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

-- Spending order: soonest expiry first; at equal expiry limited-time points first; then oldest.
local function spendable_lots()
  local list = {}
  for _, l in pairs(A.lots) do
    if l.pts > 0 and l.exp > NOW then list[#list + 1] = l end
  end
  table.sort(list, function(x, y)
    if x.exp ~= y.exp then return x.exp < y.exp end
    if x.kind ~= y.kind then return x.kind == 'L' end
    return x.id < y.id
  end)
  return list
end

-- Takes `amount` points from the spendable lots; returns the allocation in spending order:
-- {{lot id, points, exp, kind, issuer, returned}, ...} (codec.py, AllocEntry).
local function take(amount, first_lot)
  local alloc, rest = {}, amount
  local order = spendable_lots()
  if first_lot then
    local l = A.lots[first_lot]
    if l and l.pts > 0 and l.exp > NOW then table.insert(order, 1, l) end
  end
  for _, l in ipairs(order) do
    if rest == 0 then break end
    local n = math.min(l.pts, rest)
    if n > 0 then
      l.pts = l.pts - n
      rest = rest - n
      A.dirty_lots[l.id] = true
      alloc[#alloc + 1] = {l.id, n, l.exp, l.kind, l.iss, 0}
    end
  end
  return alloc
end

-- Puts n points back into the lot an allocation entry came from, recreating the lot (with its
-- original expiry, kind and issuer) if it was emptied and removed.
local function give_back(entry, n)
  local id = entry[1]
  local l = A.lots[id]
  if not l then
    l = {id = id, pts = 0, exp = entry[3], kind = entry[4], iss = entry[5]}
    A.lots[id] = l
  end
  l.pts = l.pts + n
  A.dirty_lots[id] = true
end

-- Lot effects {{lot id, signed points, exp, kind, issuer}, ...}: codec.py, LotEntry.
local function effects(alloc, sign)
  local out = {}
  for i, e in ipairs(alloc) do out[i] = {e[1], sign * e[2], e[3], e[4], e[5]} end
  return out
end

-- Hold index members are the holds' ids "<account>.<seq>" (codec.py, hold_member).
local function hold_member(seq) return ACCOUNT .. '.' .. fmt(seq) end

local function drop_hold(seq)
  A.holds[seq] = nil
  A.dirty_holds[seq] = true
  A.hold_rem[#A.hold_rem + 1] = hold_member(seq)
end

-- Time-driven changes: holds past their TTL give their points back, then lots past their
-- expiry lose what is left. Both are events, so the journal records breakage.
local function expire()
  for _, seq in ipairs(sorted_keys(A.holds)) do
    local h = A.holds[seq]
    if h.exp <= NOW then
      local rec = tx_get(seq)
      for _, e in ipairs(rec.alloc) do give_back(e, e[2]) end
      rec.state = 'EXPIRED'
      rec.released = h.pts
      tx_put(seq, rec)
      drop_hold(seq)
      emit({type = 'HOLD_EXPIRED', pts = h.pts, ref = seq, lots = effects(rec.alloc, 1)})
    end
  end
  local gone, total = {}, 0
  for _, id in ipairs(sorted_keys(A.lots)) do
    local l = A.lots[id]
    if l.exp <= NOW and l.pts > 0 then
      gone[#gone + 1] = {id, -l.pts, l.exp, l.kind, l.iss}
      total = total + l.pts
      l.pts = 0
      A.dirty_lots[id] = true
    end
  end
  if #gone > 0 then emit({type = 'LOTS_EXPIRED', pts = total, lots = gone}) end
end

-- Transaction records are kept for the refund window; each commit forgets a few older ones.
local function prune_transactions(writes)
  local budget = 4
  while budget > 0 and A.x0 <= A.seq do
    local rec = tx_get(A.x0)
    if rec then
      if rec.time > NOW - TX_RETENTION or A.holds[A.x0] then break end
      writes[#writes + 1] = A.x0
      A.tx[A.x0] = false
    end
    A.x0 = A.x0 + 1
    budget = budget - 1
  end
end

-- Writes the account hash's changed fields (codec.py, AccountHash), the changed records, the
-- hold index and the events.
local function commit()
  local set, del = {'seq', fmt(A.seq)}, {}
  for _, id in ipairs(sorted_keys(A.dirty_lots)) do
    local l = A.lots[id]
    if l and l.pts > 0 then
      set[#set + 1] = 'l:' .. fmt(id)
      set[#set + 1] = fmt(l.pts) .. ':' .. fmt(l.exp) .. ':' .. l.kind .. ':' .. l.iss
    else
      del[#del + 1] = 'l:' .. fmt(id)
      A.lots[id] = nil
    end
  end
  for _, seq in ipairs(sorted_keys(A.dirty_holds)) do
    local h = A.holds[seq]
    if h then
      set[#set + 1] = 'h:' .. fmt(seq)
      set[#set + 1] = fmt(h.pts) .. ':' .. fmt(h.exp)
    else
      del[#del + 1] = 'h:' .. fmt(seq)
    end
  end
  local forget = {}
  if next(A.dirty_tx) then prune_transactions(forget) end
  set[#set + 1] = 'x0'
  set[#set + 1] = fmt(A.x0)
  redis.call('HSET', K_ACCOUNT, unpack(set))
  if #del > 0 then redis.call('HDEL', K_ACCOUNT, unpack(del)) end
  for _, seq in ipairs(sorted_keys(A.dirty_tx)) do
    redis.call('HSET', K_TX, fmt(seq), cmsgpack.pack(A.tx[seq]))
  end
  for _, seq in ipairs(forget) do redis.call('HDEL', K_TX, fmt(seq)) end
  for _, h in ipairs(A.hold_add) do redis.call('ZADD', K_HOLDS, h[2], h[1]) end
  if #A.hold_rem > 0 then redis.call('ZREM', K_HOLDS, unpack(A.hold_rem)) end
  for _, ev in ipairs(A.events) do redis.call('XADD', K_EVENTS, '*', 'e', cmsgpack.pack(ev)) end
end

-- The answer: codec.py, OpResult.
local function finish(result)
  result.code = result.code or 'OK'
  if result.code == 'OK' then commit() end
  local last = A.events[#A.events]
  if last then
    -- The balance after the last event is the balance now (see emit), computed once.
    result.available, result.held = last.available, last.held
  else
    result.available, result.held = available(), held()
  end
  local packed = cmsgpack.pack(result)
  if K_IDEM then
    redis.call('SET', K_IDEM, FINGERPRINT .. packed, 'EX', IDEM_TTL)
    -- A refusal has no event; this entry tells the write-behind to keep its record durable too
    -- (codec.py, IdempotencyNote).
    if result.code ~= 'OK' and ARGS.rid then
      redis.call('XADD', K_EVENTS, '*', 'i', cmsgpack.pack({account = ACCOUNT, rid = ARGS.rid}))
    end
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
    state = '', exp = 0, captured = 0, released = 0, capture = 0, amount = ev.amount or 0}
  for k, v in pairs(fields) do rec[k] = v end
  return rec
end

local OPS = {}

function OPS.create_account()
  if A.exists then
    return refuse('ALREADY_EXISTS', 'ACCOUNT_ALREADY_EXISTS', 'account ' .. ACCOUNT .. ' already exists')
  end
  emit(event_base('ACCOUNT_OPENED', {card = ARGS.card, pts = 0, lots = {}}))
  return finish({})
end

-- EARN and GRANT: a new lot whose id is the transaction's sequence number.
function OPS.earn()
  local pts, exp = ARGS.pts, ARGS.exp
  if pts > 0 and exp <= NOW then
    return refuse('FAILED_PRECONDITION', 'LOT_ALREADY_EXPIRED', 'the new lot would already be expired')
  end
  if over_cap(pts) then return balance_limit() end
  local seq = A.seq + 1
  local lots = {}
  if pts > 0 then
    A.lots[seq] = {id = seq, pts = pts, exp = exp, kind = ARGS.kind, iss = ARGS.pos[1]}
    A.dirty_lots[seq] = true
    lots = {{seq, pts, exp, ARGS.kind, ARGS.pos[1]}}
  end
  local ev = event_base(ARGS.type, {pts = pts, lots = lots, amount = ARGS.amount, ptime = ARGS.ptime})
  emit(ev)
  tx_put(seq, new_tx(ARGS.type, ev, {}))
  return finish({tx = seq, pts = pts, lots = lots})
end

function OPS.authorize()
  local pts = ARGS.pts
  if available() < pts then return insufficient(pts) end
  local alloc = take(pts)
  local exp = NOW + ARGS.ttl
  local seq = A.seq + 1 -- the hold is held before its event, whose balance counts it
  A.holds[seq] = {pts = pts, exp = exp}
  A.dirty_holds[seq] = true
  A.hold_add[#A.hold_add + 1] = {hold_member(seq), exp}
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
    if e[2] > n then
      give_back(e, e[2] - n)
      released[#released + 1] = {e[1], e[2] - n, e[3], e[4], e[5]}
    end
  end
  local released_pts = rec.pts - want
  drop_hold(ARGS.hold)
  -- `lots`: what went back to the lots; `spent`: the capture's own effects, what it used.
  local spent = effects(used, -1)
  local ev = event_base('HOLD_CAPTURED', {pts = want, released = released_pts, ref = ARGS.hold,
    lots = effects(released, 1), alloc = used, spent = spent})
  local seq = emit(ev)
  rec.state, rec.captured, rec.released, rec.capture = 'CAPTURED', want, released_pts, seq
  tx_put(ARGS.hold, rec)
  tx_put(seq, new_tx('CAPTURE', ev, {alloc = used, lots = spent}))
  return finish({tx = seq, pts = want, released = released_pts})
end

function OPS.void()
  local rec, refusal = open_hold()
  if not rec then return refusal end
  for _, e in ipairs(rec.alloc) do give_back(e, e[2]) end
  drop_hold(ARGS.hold)
  emit(event_base('HOLD_VOIDED', {pts = rec.pts, ref = ARGS.hold, lots = effects(rec.alloc, 1)}))
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

-- An earn's refund takes points back (from its own lot first); a capture's or redemption's
-- gives them back to the lots they came from, the last-spent first.
function OPS.refund()
  local orig = tx_get(ARGS.orig)
  local refundable = {EARN = true, GRANT = true, CAPTURE = true, REDEMPTION = true}
  if not orig or not refundable[orig.type] then
    return refuse('NOT_FOUND', 'TRANSACTION_NOT_FOUND',
      'no refundable transaction ' .. ACCOUNT .. '.' .. fmt(ARGS.orig))
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
  local lots, returned
  if orig.type == 'EARN' or orig.type == 'GRANT' then
    if available() < want then return insufficient(want) end
    lots = effects(take(want, ARGS.orig), -1)
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
        give_back(e, n)
        e[6] = e[6] + n
        rest = rest - n
        lots[#lots + 1] = {e[1], n, e[3], e[4], e[5]}
        returned[#returned + 1] = {i - 1, e[6]}
      end
    end
  end
  orig.refunded = orig.refunded + want
  local ev = event_base('REFUNDED', {pts = want, ref = ARGS.orig, lots = lots, refunded = orig.refunded,
    returned = returned})
  local seq = emit(ev)
  tx_put(ARGS.orig, orig)
  tx_put(seq, new_tx('REFUND', ev, {}))
  return finish({tx = seq, pts = want, lots = lots})
end

-- Balance inquiry; also what the sweeper calls to resolve expired holds. Writes only when
-- time has expired something.
function OPS.balance()
  local lots = {}
  for i, l in ipairs(spendable_lots()) do lots[i] = {l.id, l.pts, l.exp, l.kind, l.iss} end
  if #A.events > 0 then commit() end
  return cmsgpack.pack({code = 'OK', lots = lots, available = available(), held = held()})
end

load()
if not A.exists and OP ~= 'create_account' then
  return cmsgpack.pack({code = 'NOT_FOUND', reason = 'ACCOUNT_NOT_FOUND', message = 'no account ' .. ACCOUNT})
end
expire()
return OPS[OP]()
end

-- Neither function is no-writes: balance writes too when time has expired something. Without
-- allow-cross-slot-keys, Redis Cluster refuses a call whose keys span slots.
redis.register_function{function_name = 'pointauth_ledger_$VERSION', callback = ledger}

-- Gives a card claim back only if it still names this account (compare and delete).
-- KEYS: card bucket. ARGV: card number, account id.
redis.register_function{function_name = 'pointauth_release_card_$VERSION', callback = function(KEYS, ARGV)
  if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return redis.call('HDEL', KEYS[1], ARGV[1]) end
  return 0
end}
