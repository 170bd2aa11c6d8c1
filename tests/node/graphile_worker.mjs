// Graphile Worker's own runOnce, for dlqd's adapter tests: runs every job
// that is due now, then exits. Task "flaky" counts its runs by its payload's
// key in adapter_runs and fails while the count is low; "doomed" always fails.
//   node graphile_worker.mjs CONNECTION_STRING
import { runOnce } from "graphile-worker";

const connectionString = process.argv[2];

const taskList = {
  flaky: async (payload, helpers) => {
    const { rows } = await helpers.withPgClient((client) =>
      client.query(
        "UPDATE adapter_runs SET runs = runs + 1 WHERE job = $1 RETURNING runs, fail_to",
        [payload.key],
      ),
    );
    if (rows.length === 0) throw new Error(`no run count for ${payload.key}`);
    if (rows[0].runs <= rows[0].fail_to) {
      throw new Error(`${payload.key}: run ${rows[0].runs} fails on purpose`);
    }
  },
  doomed: async () => {
    throw new TypeError("doomed");
  },
};

await runOnce({ connectionString, taskList, concurrency: 4, noHandleSignals: true });
