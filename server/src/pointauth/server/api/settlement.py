"""SettlementService: settling periods between group companies (services/settlement.py); the
domain's statement becomes the proto's here."""

from __future__ import annotations

from typing import Any

import grpc

from pointauth.server.api import convert
from pointauth.server.api.access import caller_id
from pointauth.server.api.validation import Violations
from pointauth.server.clock import to_ms
from pointauth.server.domain.settlement import Flow, PairLine, Period, Statement
from pointauth.server.services.settlement import SettlementService, statement_csv
from pointauth.v1 import settlement_service_pb2 as pb
from pointauth.v1 import settlement_service_pb2_grpc

Context = grpc.aio.ServicerContext[Any, Any]

_FLOWS = {f: pb.Flow.Value(f"FLOW_{f.value}") for f in Flow}


def _pair(x: PairLine) -> pb.PairTotals:
    return pb.PairTotals(
        issuer_id=x.issuer_id, company_id=x.company_id, store_id=x.store_id, used=x.used,
        use_refunded=x.use_refunded, net=x.net,
    )  # fmt: skip


def statement_message(s: Statement, *, include_stores: bool = True) -> pb.Statement:
    return pb.Statement(
        period=s.period.name,
        time_zone=s.period.zone,
        start_time=convert.timestamp(to_ms(s.period.starts)),
        end_time=convert.timestamp(to_ms(s.period.ends)),
        close_time=convert.timestamp(to_ms(s.closed_at)) if s.closed_at else None,
        closed_by=s.closed_by,
        issuers=[
            pb.IssuerTotals(
                issuer_id=i.issuer_id,
                point_value_yen=i.value.yen,
                point_value_points=i.value.points,
                points={f.value: i.totals[f] for f in Flow},
                outstanding_change=i.outstanding_change,
            )
            for i in s.issuers
        ],
        pairs=[_pair(x) for x in s.pairs],
        stores=[_pair(x) for x in s.stores] if include_stores else [],
        payments=[pb.Payment(payer_id=p.payer_id, payee_id=p.payee_id, yen=p.yen) for p in s.payments],
        adjustments=[
            pb.Adjustment(
                transaction_id=a.transaction_id,
                adjusts_transaction_id=a.adjusts_transaction_id,
                adjusts_period=a.ref_period,
                flow=_FLOWS[a.flow],
                issuer_id=a.issuer_id,
                company_id=a.company_id,
                store_id=a.store_id,
                points=a.points,
            )
            for a in s.adjustments
        ],
        tie_out=[
            pb.TieOut(name=name, flow_points=flows, journal_points=journal)
            for name, (flows, journal) in s.tie_out.items()
        ],
        flows=s.flows,
    )


class SettlementServicer(settlement_service_pb2_grpc.SettlementServiceServicer):
    def __init__(self, settlement: SettlementService) -> None:
        self.settlement = settlement

    def _period(self, v: Violations, name: str) -> Period:
        try:
            return self.settlement.period(name)
        except ValueError:
            v.add("period", "must be a month as YYYY-MM (e.g. 2026-11)")
            return Period("2000-01", self.settlement.zone)

    @staticmethod
    def _company(v: Violations, company_id: str) -> str:
        if company_id:
            v.identifier("company_id", company_id)
        return company_id

    async def Settle(self, request: pb.SettleRequest, context: Context) -> pb.SettleResponse:
        v = Violations()
        period, company = self._period(v, request.period), self._company(v, request.company_id)
        v.raise_if_any()
        statement = await self.settlement.settle(period, close=request.close, actor=_caller(context))
        if company:
            statement = statement.for_company(company)
        return pb.SettleResponse(statement=statement_message(statement, include_stores=request.include_stores))

    async def GetStatement(self, request: pb.GetStatementRequest, context: Context) -> pb.GetStatementResponse:
        v = Violations()
        period, company = self._period(v, request.period), self._company(v, request.company_id)
        v.raise_if_any()
        statement = await self.settlement.statement(period)
        if company:
            statement = statement.for_company(company)
        return pb.GetStatementResponse(statement=statement_message(statement, include_stores=request.include_stores))

    async def ListStatements(self, request: pb.ListStatementsRequest, context: Context) -> pb.ListStatementsResponse:
        v = Violations()
        company = self._company(v, request.company_id)
        v.raise_if_any()
        headers = await self.settlement.statements(company)
        return pb.ListStatementsResponse(statements=[statement_message(s) for s in headers])

    async def ExportStatement(self, request: pb.ExportStatementRequest, context: Context) -> pb.ExportStatementResponse:
        v = Violations()
        period, company = self._period(v, request.period), self._company(v, request.company_id)
        v.raise_if_any()
        statement = await self.settlement.statement(period)
        return pb.ExportStatementResponse(csv=statement_csv(statement.for_company(company) if company else statement))


def _caller(context: Context) -> str:
    """Who closes a statement: the caller's credential; with auth off, where the call came from."""
    return caller_id() or f"rpc:{context.peer()}"
