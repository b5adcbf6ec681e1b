from tests.integration.test_ddl import env, run, rows, started  # noqa
from cdc.lsn import format_lsn

def test_dbg(env):
    started(env, "CREATE TABLE t (id int PRIMARY KEY, v text)", "INSERT INTO t VALUES (1, 'a'), (2, 'b')")
    v0 = run(env, "UPDATE t SET v = 'a1' WHERE id = 1")
    env.wait_caught_up()
    print("v0", format_lsn(v0))
    with env.store() as c:
        for r in c.execute("select position, ordinal, op, image from changes order by 1,2"):
            print(format_lsn(r[0]), r[1:])
        print(c.execute("select * from capture_state").fetchall())
    print(rows(env, v0, "t"))
