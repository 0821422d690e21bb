"""PostgreSQL as the oracle (issue 30): generated multi-client programs (programs.py) against
PostgreSQL directly and through Tidepool, pools of one and two servers in transaction mode with
session_state = track, observations compared client by client.

Fixed seeds here, within a fixed budget; DIFFERENTIAL_SECONDS and DIFFERENTIAL_SEED run longer
with random seeds (scripts/differential.sh).
"""

import os
import random
import time

import psycopg
import pytest

import programs


def connectors(pg, t):
    def direct(**kw):
        return psycopg.connect(host="127.0.0.1", port=pg.port, dbname="postgres", user="postgres",
                               autocommit=True, **kw)

    def pooled(**kw):
        return psycopg.connect(host="127.0.0.1", port=t.port, dbname="postgres", user="postgres",
                               autocommit=True, connect_timeout=30, **kw)

    direct.port = pg.port
    pooled.port = t.port
    return direct, pooled


@pytest.mark.parametrize("pool_size", [1, 2])
def test_programs_see_what_postgresql_shows_them(pg, tidepool, pool_size):
    t = tidepool(settings=f"pool_mode = transaction\ndefault_pool_size = {pool_size}\n"
                          "session_state = track\nquery_wait_timeout = 120\nmax_prepared_statements = 100\n")
    direct, pooled = connectors(pg, t)
    seconds = float(os.environ.get("DIFFERENTIAL_SECONDS", "0"))
    first = int(os.environ.get("DIFFERENTIAL_SEED", "0")) or None
    seeds = iter(range(100 * pool_size, 100 * pool_size + 20)) if not seconds else None
    deadline = time.time() + seconds
    rng = random.Random(first)
    programs_run = 0
    found_in_long_run = []
    while True:
        if seeds is not None:
            seed = next(seeds, None)
            if seed is None:
                break
        else:
            if time.time() > deadline:
                break
            seed = rng.randrange(1 << 30)
        program = programs.generate(seed)
        found = programs.differs(direct, pooled, program)
        programs_run += 1
        if found:
            small = programs.shrink(direct, pooled, program)
            found = programs.differs(direct, pooled, small) or found
            client, step, expected, got = found
            report = (f"seed {seed}, pool size {pool_size}: client {client} differs at step {step}\n"
                      f"  PostgreSQL: {expected}\n  Tidepool:   {got}\nprogram:\n{programs.describe(small)}")
            if seconds == 0:
                pytest.fail(report)
            # A long run goes on, to count what it finds.
            found_in_long_run.append(report)
            print(report, flush=True)
    print(f"pool size {pool_size}: {programs_run} programs, {len(found_in_long_run)} divergent")
    assert not found_in_long_run, f"{len(found_in_long_run)} of {programs_run} programs differ (printed above)"
