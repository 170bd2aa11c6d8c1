// pg-boss's own client and worker, for dlqd's adapter tests.
//   node pg_boss.mjs queue CONNECTION NAME RETRY_LIMIT RETRY_DELAY
//   node pg_boss.mjs send CONNECTION NAME JSON
//   node pg_boss.mjs work CONNECTION NAME
// "work" runs pg-boss's worker (boss.work) on queue NAME until no job of it
// is due, then stops. A job's data.key counts its runs in adapter_runs, and
// it fails while the count is low; a job without a key always fails.
import { PgBoss } from "pg-boss";

const [command, connectionString, name, ...rest] = process.argv.slice(2);
const boss = new PgBoss({ connectionString, migrate: false, supervise: false, schedule: false });
boss.on("error", (error) => console.error(error));
await boss.start();
const db = boss.getDb();

if (command === "queue") {
  await boss.createQueue(name, { retryLimit: Number(rest[0]), retryDelay: Number(rest[1]) });
} else if (command === "send") {
  console.log(JSON.stringify({ id: await boss.send(name, JSON.parse(rest[0])) }));
} else if (command === "work") {
  await boss.work(name, { pollingIntervalSeconds: 0.5 }, async ([job]) => {
    if (!job.data.key) throw new RangeError("doomed");
    const { rows } = await db.executeSql(
      "UPDATE adapter_runs SET runs = runs + 1 WHERE job = $1 RETURNING runs, fail_to",
      [job.data.key],
    );
    if (rows[0].runs <= rows[0].fail_to) {
      throw new TypeError(`${job.data.key}: run ${rows[0].runs} fails on purpose`);
    }
  });
  // until nothing of the queue is due or running, twice in a row
  for (let quiet = 0; quiet < 2; ) {
    await new Promise((resolve) => setTimeout(resolve, 300));
    const { rows } = await db.executeSql(
      `SELECT count(*)::int AS n FROM pgboss.job WHERE name = $1
          AND (state = 'active' OR (state IN ('created', 'retry') AND start_after <= now()))`,
      [name],
    );
    quiet = rows[0].n === 0 ? quiet + 1 : 0;
  }
} else {
  throw new Error(`unknown command ${command}`);
}
await boss.stop({ graceful: true, wait: true });
