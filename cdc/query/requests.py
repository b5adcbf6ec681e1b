"""Requests and the mutation log.

There is no table of requests: a request's record is derived on read (docs/store.md
"Transactions and context") from its transactions and context changes (by ``request_id``),
their outcome, the changes made under its context, and the errors it reported
(``request_errors``). An error is the request's root cause only when a verified context of the
request came from the same database user and backend as the error, or the reporter proved with
its session token that it wrote one (docs/security.md "Request attribution"); any other is shown
as reported by another session.

A request's (or an actor's) changes are found through *spans*: the ordinal ranges of a
transaction in which its context held (the transaction's context from ordinal 0, each
``context_changes`` row from its ``from_ordinal`` to the next one).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg import sql

from cdc.errors import AmbiguousRequestError, NotFoundError, UsageError
from cdc.query.changes import CHANGE_COLUMNS, CHANGE_FIELDS, MAX_ORDINAL, parse_json
from cdc.query.model import (
    Key,
    Mutation,
    MutationPage,
    RequestError,
    RequestRecord,
    TransactionInfo,
    attribution,
    trace_of,
)
from cdc.query.tables import Tables
from cdc.store.format import OP_CODES, OPS, STATUS_NAMES, STATUSES, ChangeFlag, TxnFlag

__all__ = ["SHORT_ID_CHARS", "Requests"]

_ROLLED_BACK = sql.Literal(int(ChangeFlag.ROLLED_BACK))
_MAX_CANDIDATES = 11
#: Readers shorten a request id (where space is short) to no fewer characters than this.
SHORT_ID_CHARS = 8
_SPAN_COLUMNS = ("request_id", "actor")


@dataclass(frozen=True)
class _Span:
    """Changes ``lo <= ordinal < hi`` of the transaction at ``position`` ran under ``context``."""

    position: int
    committed_at: datetime
    lo: int
    hi: int
    request_id: str | None
    actor: str | None
    context: dict[str, Any] | None


@dataclass(frozen=True)
class _Found:
    transactions: list[TransactionInfo]
    spans: list[_Span]  # every span of those transactions, matching or not
    matching: list[_Span]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


class Requests(Tables):
    """Reads of requests, actors and the mutation log."""

    # ------------------------------------------------------------------ spans

    def _spans(
        self, column: str, value: str, *, upto: int | None = None, newest: int | None = None
    ) -> _Found:
        """The transactions where ``column`` (request_id or actor) had ``value``, and their spans;
        ``newest``: only that many of them, the newest at or before position ``upto``."""
        assert column in _SPAN_COLUMNS
        col = sql.Identifier(column)
        bound = sql.SQL(" AND position <= %(upto)s" if upto is not None else "")
        cut = sql.SQL(" ORDER BY position DESC LIMIT %(newest)s" if newest is not None else "")
        rows = self._rows(
            sql.SQL(
                "WITH hits AS ((SELECT position, committed_at FROM {tx} WHERE {col} = %(v)s{b}{cut}) "
                "  UNION (SELECT position, committed_at FROM {cc} WHERE {col} = %(v)s{b}{cut}){cut}) "
                "SELECT t.position, t.committed_at, t.xid, t.commit_lsn, t.status, t.flags, t.origin, "
                "  t.change_count, t.request_id, t.actor, t.context, "
                "  (SELECT json_agg(json_build_array(c.from_ordinal, c.request_id, c.actor, c.context) "
                "     ORDER BY c.from_ordinal) FROM {cc} c "
                "   WHERE c.position = t.position AND c.committed_at = t.committed_at) AS changes "
                "FROM hits h JOIN {tx} t ON t.position = h.position AND t.committed_at = h.committed_at "
                "ORDER BY t.position"
            ).format(
                tx=self._t("transactions_all"), cc=self._t("context_changes_all"), col=col, b=bound, cut=cut
            ),
            {"v": value, "upto": upto, "newest": newest},
        )
        transactions: list[TransactionInfo] = []
        spans: list[_Span] = []
        for r in rows:
            status = STATUS_NAMES[r["status"]]
            flags = int(r["flags"])
            transactions.append(
                TransactionInfo(
                    position=int(r["position"]),
                    xid=int(r["xid"]),
                    version=int(r["position"]) if status == "committed" else None,
                    commit_lsn=None if r["commit_lsn"] is None else int(r["commit_lsn"]),
                    status=status,
                    committed_at=r["committed_at"],
                    origin=r["origin"],
                    mutation_count=int(r["change_count"]),
                    possibly_incomplete=bool(flags & TxnFlag.MAYBE_INCOMPLETE),
                    flags=flags,
                )
            )
            starts = [(0, r["request_id"], r["actor"], r["context"])]
            starts += [(int(o), rid, actor, ctx) for o, rid, actor, ctx in r["changes"] or []]
            for i, (lo, rid, actor, ctx) in enumerate(starts):
                hi = starts[i + 1][0] if i + 1 < len(starts) else MAX_ORDINAL
                if hi > lo:
                    spans.append(
                        _Span(int(r["position"]), r["committed_at"], lo, hi, rid, actor, parse_json(ctx))
                    )
        matching = [s for s in spans if getattr(s, column) == value]
        return _Found(transactions, spans, matching)

    def _span_changes(
        self, spans: Sequence[_Span], where: sql.Composable, order: sql.Composable, params: dict[str, Any]
    ) -> sql.Composed:
        """The changes of ``spans`` (CHANGE_COLUMNS) that match ``where``, ``order``-ed."""
        params.update(
            sp=[s.position for s in spans],
            sa=[s.committed_at for s in spans],
            sl=[s.lo for s in spans],
            sh=[s.hi for s in spans],
        )
        return sql.SQL(
            "SELECT {outer} FROM unnest(%(sp)s::bigint[], %(sa)s::timestamptz[], %(sl)s::int[], %(sh)s::int[]) "
            "AS r(p, a, lo, hi) CROSS JOIN LATERAL (SELECT {cols} FROM {c} WHERE position = r.p "
            "AND committed_at = r.a AND ordinal >= r.lo AND ordinal < r.hi) c WHERE {where} {order}"
        ).format(
            outer=sql.SQL(", ").join(sql.Identifier("c", n) for n in CHANGE_FIELDS),
            cols=CHANGE_COLUMNS,
            c=self._t("changes_all"),
            where=where,
            order=order,
        )

    # ------------------------------------------------------------------ request ids

    def resolve_request(self, request_id: str) -> str:
        """The full request id for ``request_id`` or a unique prefix of one.

        :class:`NotFoundError` when nothing matches, :class:`UsageError` (listing the candidates)
        when a prefix is ambiguous.
        """
        wanted = request_id.strip()
        if not wanted:
            raise UsageError("invalid request id: empty")
        sources = [self._t("transactions_all"), self._t("context_changes_all"), self._t("request_errors")]
        rows = self._rows(
            sql.SQL("SELECT {} AS found").format(
                sql.SQL(" OR ").join(
                    sql.SQL("EXISTS (SELECT 1 FROM {} WHERE request_id = %(id)s)").format(s) for s in sources
                )
            ),
            {"id": wanted},
        )
        if rows[0]["found"]:
            return wanted
        # Distinct ids by prefix: a skip scan of each text_pattern_ops index (one seek per id).
        parts = [
            sql.SQL(
                "(WITH RECURSIVE ids(id) AS ("
                "  (SELECT request_id FROM {s} WHERE request_id LIKE {like} ORDER BY request_id USING ~<~ LIMIT 1)"
                "  UNION ALL SELECT (SELECT request_id FROM {s} WHERE request_id LIKE {like} "
                "    AND request_id ~>~ ids.id ORDER BY request_id USING ~<~ LIMIT 1) FROM ids "
                "  WHERE ids.id IS NOT NULL) "
                "SELECT id FROM ids WHERE id IS NOT NULL LIMIT {n})"
            ).format(s=s, n=sql.Literal(_MAX_CANDIDATES), like=sql.Literal(_like_prefix(wanted)))
            for s in sources
        ]
        # The pattern as a literal: the planner turns a known prefix into an index range.
        found = self._rows(
            sql.SQL("SELECT DISTINCT id FROM ({}) x ORDER BY 1 LIMIT {}").format(
                sql.SQL(" UNION ALL ").join(parts), sql.Literal(_MAX_CANDIDATES)
            ),
            prepare=False,
        )
        candidates = [str(r["id"]) for r in found]
        if not candidates:
            raise NotFoundError(
                f"no request {wanted!r} in the history (no id equal to it or starting with it)"
            )
        if len(candidates) > 1:
            raise AmbiguousRequestError(wanted, candidates)
        return candidates[0]

    def request_prefixes(
        self, request_ids: Iterable[str | None], min_chars: int = SHORT_ID_CHARS
    ) -> dict[str, str]:
        """For each request id: its shortest prefix of at least ``min_chars`` characters that no
        other stored request id starts with (the id itself when no shorter one is), so that
        :meth:`resolve_request` finds it again. What readers show where space is short.

        The longest prefix an id shares with any other is the one it shares with one of its two
        neighbours in byte order: two index seeks per source of request ids.
        """
        wanted = sorted({r for r in request_ids if r and len(r) > min_chars})
        found = {r: r for r in request_ids if r and len(r) <= min_chars}
        if not wanted:
            return found
        sources = [self._t("transactions_all"), self._t("context_changes_all"), self._t("request_errors")]
        neighbours = sql.SQL(", ").join(
            sql.SQL(
                "(SELECT request_id FROM {s} WHERE request_id ~<~ w.id ORDER BY request_id USING ~>~ LIMIT 1), "
                "(SELECT request_id FROM {s} WHERE request_id ~>~ w.id ORDER BY request_id USING ~<~ LIMIT 1)"
            ).format(s=s)
            for s in sources
        )
        rows = self._rows(
            sql.SQL("SELECT w.id, ARRAY[{}] AS near FROM unnest(%(ids)s::text[]) AS w(id)").format(
                neighbours
            ),
            {"ids": wanted},
        )
        for r in rows:
            rid = str(r["id"])
            shared = max((_common_prefix(rid, str(n)) for n in r["near"] if n is not None), default=0)
            found[rid] = rid[: max(min_chars, shared + 1)]
        return found

    # ------------------------------------------------------------------ requests

    def request_mutations(
        self, request_id: str, *, limit: int | None = None, after: tuple[int, int] | None = None
    ) -> list[Mutation]:
        """The mutations of a request (id or unique prefix), oldest first."""
        full = self.resolve_request(request_id)
        return self._request_mutations(self._spans("request_id", full).matching, limit=limit, after=after)

    def _request_mutations(
        self, spans: Sequence[_Span], *, limit: int | None = None, after: tuple[int, int] | None = None
    ) -> list[Mutation]:
        if not spans or limit == 0:
            return []
        params: dict[str, Any] = {"limit": limit}
        where: sql.Composable = sql.SQL("true")
        if after is not None:
            where = sql.SQL("c.position >= %(cp)s AND (c.position > %(cp)s OR c.ordinal > %(co)s)")
            params["cp"], params["co"] = after
        inner = self._span_changes(
            spans, where, sql.SQL("ORDER BY c.position, c.ordinal LIMIT %(limit)s"), params
        )
        return self.mutations_of(self._raw_changes(self._decorated(inner), params))

    def request(self, request_id: str, *, mutation_limit: int | None = 1000) -> RequestRecord:
        """The request's record: context, outcome, errors, transactions and (up to
        ``mutation_limit``) mutations."""
        full = self.resolve_request(request_id)
        found = self._spans("request_id", full)
        spans = found.matching
        counts: dict[int, tuple[int, int]] = {}
        if spans:
            params: dict[str, Any] = {}
            inner = self._span_changes(spans, sql.SQL("true"), sql.SQL(""), params)
            for r in self._rows(
                sql.SQL(
                    "SELECT position, count(*) AS n, count(*) FILTER (WHERE flags & {rb} <> 0) AS rb "
                    "FROM ({}) x GROUP BY position"
                ).format(inner, rb=_ROLLED_BACK),
                params,
            ):
                counts[int(r["position"])] = (int(r["n"]), int(r["rb"]))
        committed = rolled_back = 0
        for t in found.transactions:
            n, rb = counts.get(t.position, (0, 0))
            if t.status == "rolled_back":
                rolled_back += 1
                continue
            if rb < n or n == 0:
                committed += 1
            if rb:
                rolled_back += 1  # a rolled-back savepoint of a committed transaction
        # The sessions whose verified contexts carried this request id: whose errors are its own.
        sessions = tuple(
            dict.fromkeys(
                (str(s.context["db_user"]), int(s.context["backend_pid"]))
                for s in spans
                if s.context is not None
                and isinstance(s.context.get("db_user"), str)
                and isinstance(s.context.get("backend_pid"), int)
            )
        )
        errors = []
        for r in self._rows(
            sql.SQL("SELECT * FROM {} WHERE request_id = %(r)s ORDER BY lsn").format(
                self._t("request_errors")
            ),
            {"r": full},
        ):
            proven = r.get("reporter_pid") is not None
            errors.append(
                RequestError(
                    error_type=r["error_type"],
                    message=r["message"],
                    location=r["location"],
                    at=r["reported_at"],
                    db_user=r["db_user"],
                    backend_pid=r["backend_pid"],
                    attribution=attribution(r["db_user"], r["backend_pid"], proven, sessions),
                    client_addr=r["client_addr"],
                    xid=r["xid"],
                    proven=proven,
                )
            )
        cause = next((e for e in errors if e.attributed), None)
        times = [t.committed_at for t in found.transactions] or [e.at for e in errors if e.at is not None]
        context = next((s.context for s in spans if s.context), None)
        traces = tuple(dict.fromkeys(t for t in (trace_of(s.context) for s in spans) if t is not None))
        return RequestRecord(
            request_id=full,
            actor=next((s.actor for s in spans if s.actor), None) or (context or {}).get("actor"),
            context=context,
            first_seen_at=min(times) if times else None,
            last_seen_at=max(times) if times else None,
            committed_count=committed,
            rolled_back_count=rolled_back,
            error_type=cause.error_type if cause else None,
            error_message=cause.message if cause else None,
            error_location=cause.location if cause else None,
            error_at=cause.at if cause else None,
            transactions=found.transactions,
            mutations=self._request_mutations(spans, limit=mutation_limit),
            mutation_count=sum(n for n, _ in counts.values()),
            errors=errors,
            sessions=sessions,
            traces=traces,
        )

    # ------------------------------------------------------------------ the log

    def mutation_log(
        self,
        *,
        table: str | None = None,
        key: Key | None = None,
        request_id: str | None = None,
        actor: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        status: str | None = None,
        op: str | None = None,
        before: tuple[int, int] | None = None,
        limit: int = 100,
    ) -> MutationPage:
        """The mutation log, newest first, filtered; ``before``: the previous page's ``next_cursor``.

        ``request_id`` must be a full id (see :meth:`resolve_request`); ``actor`` matches the
        actor of the change's context.
        """
        if limit <= 0:
            raise UsageError(f"invalid limit {limit}: must be positive")
        where: list[sql.Composable] = []
        params: dict[str, Any] = {"limit": limit}
        keys: list[sql.Composable] = []
        if table is not None:
            info = self.table(table)
            where.append(sql.SQL("c.table_id = %(t)s"))
            params["t"] = info.table_id
            if info.until is not None:
                where.append(sql.SQL("c.position < %(tu)s"))
                params["tu"] = info.until
            if key is not None:
                params["k"] = self.key_text_of(self.stored_key(info, key))
                keys = [self._key_filter(info, "key_text"), self._key_filter(info, "old_key_text")]
        elif key is not None:
            raise UsageError("a key filter needs a table")
        if since is not None:
            where.append(sql.SQL("c.committed_at >= %(since)s"))
            params["since"] = since
        if until is not None:
            where.append(sql.SQL("c.committed_at < %(until)s"))
            params["until"] = until
        if status is not None:
            if status not in STATUSES:
                raise UsageError(f"invalid status {status!r}: expected one of {', '.join(STATUSES)}")
            where.append(
                sql.SQL("c.flags & {} {} 0").format(
                    _ROLLED_BACK, sql.SQL("=" if status == "committed" else "<>")
                )
            )
        if op is not None:
            if op.upper() not in OPS:
                raise UsageError(f"invalid op {op!r}: expected one of {', '.join(OPS)}")
            where.append(sql.SQL("c.op = %(op)s"))
            params["op"] = OP_CODES[op.upper()]
        if before is not None:
            where.append(sql.SQL("c.position <= %(cp)s AND (c.position < %(cp)s OR c.ordinal < %(co)s)"))
            params["cp"], params["co"] = before
        condition = sql.SQL(" AND ").join(where) if where else sql.SQL("true")
        newest = sql.SQL("ORDER BY c.position DESC, c.ordinal DESC LIMIT %(limit)s")
        if request_id is not None or actor is not None:
            if keys:
                condition = sql.SQL("{} AND ({})").format(
                    condition, sql.SQL(" OR ").join(sql.SQL("({})").format(k) for k in keys)
                )
            found = self._span_log(request_id, actor, condition, newest, params, before, limit)
            return MutationPage(
                mutations=found, next_cursor=found[-1].cursor if len(found) == limit else None
            )
        if keys:
            inner = sql.SQL("SELECT * FROM ({a} UNION ALL {b}) c {newest}").format(
                a=sql.SQL("(SELECT {cols} FROM {c} c WHERE {k} AND {w} {n})").format(
                    cols=CHANGE_COLUMNS, c=self._t("changes_all"), k=keys[0], w=condition, n=newest
                ),
                b=sql.SQL("(SELECT {cols} FROM {c} c WHERE {k} AND {w} {n})").format(
                    cols=CHANGE_COLUMNS, c=self._t("changes_all"), k=keys[1], w=condition, n=newest
                ),
                newest=newest,
            )
        else:
            inner = sql.SQL("SELECT {cols} FROM {c} c WHERE {w} {n}").format(
                cols=CHANGE_COLUMNS, c=self._t("changes_all"), w=condition, n=newest
            )
        found = self.mutations_of(self._raw_changes(self._decorated(inner, newest_first=True), params))
        return MutationPage(mutations=found, next_cursor=found[-1].cursor if len(found) == limit else None)

    def _span_log(
        self,
        request_id: str | None,
        actor: str | None,
        condition: sql.Composable,
        newest: sql.Composable,
        params: dict[str, Any],
        before: tuple[int, int] | None,
        limit: int,
    ) -> list[Mutation]:
        """A log page of a request's or an actor's changes: from its newest transactions (before
        the cursor), as many more of them as it takes to fill the page."""
        column, value = ("request_id", request_id) if request_id is not None else ("actor", actor)
        assert value is not None
        wanted = limit
        while True:
            found = self._spans(column, value, upto=before[0] if before else None, newest=wanted)
            spans = [s for s in found.matching if actor is None or s.actor == actor]
            page: list[Mutation] = []
            if spans:
                inner = self._span_changes(spans, condition, newest, params)
                page = self.mutations_of(self._raw_changes(self._decorated(inner, newest_first=True), params))
            if len(page) >= limit or len(found.transactions) < wanted:
                return page
            wanted *= 4
