// Runs calls through a published Aztec JSON-RPC client and prints what each one gave, as one JSON line.
//
//   node aztec_client.mjs '<spec>'
//
// spec = {"client": "aztec.js" | "foundation", "dir": <npm install dir>, "url": <gateway>,
//         "namespace": "node" | "aztec" (foundation only), "calls": [{"name", "method", "params"}]}
//
// "aztec.js": createAztecNodeClient(url) of @aztec/aztec.js (4.1.2): the real client with its own
// schemas, namespace (node_*) and retrying fetch.
// "foundation": createSafeJsonRpcClient of @aztec/foundation (5.2.0), the transport of every 5.x client
// (batching, answers matched by position, result null, errors), with makeFetch([1, 2, 3], false) as
// createAztecNodeClient uses it. The 5.x node schema lives in @aztec/stdlib, which is not published
// beyond 4.x: the schema below transcribes the upstream shapes of the methods called
// (docs/aztec-protocol.md), with plain hex strings where upstream has field elements.
//
// All calls are issued in the same tick, so the client sends them as one JSON-RPC batch.
// Output: {"<name>": {"ok": true, "value": ...} | {"ok": false, "error": "...", "code": n}}.
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { pathToFileURL } from 'node:url';

const unhandled = [];
// A client schema that throws inside a transform also rejects a promise nobody awaits: keep going.
process.on('unhandledRejection', (error) => unhandled.push(String(error?.message ?? error)));

const spec = JSON.parse(process.argv[2]);
const require = createRequire(join(spec.dir, 'package.json'));
const load = (name) => import(pathToFileURL(require.resolve(name)).href);

async function aztecJsClient() {
  const { createAztecNodeClient } = await load('@aztec/aztec.js/node');
  return createAztecNodeClient(spec.url);
}

async function foundationClient() {
  const { createSafeJsonRpcClient, makeFetch } = await load('@aztec/foundation/json-rpc/client');
  const { z } = await load('zod');
  const hex = z.string().regex(/^0x[0-9a-fA-F]+$/);
  const number = z.coerce.number().int().nonnegative();
  const ref = z.object({ number, hash: hex });
  const tip = z.object({ block: ref, checkpoint: ref });
  const tag = z.enum(['proposed', 'checkpointed', 'proven', 'finalized']);
  const snapshot = z.object({ root: hex, nextAvailableLeafIndex: number });
  const blockParameter = z.union([number, hex, tag, z.literal('latest'), z.object({ number }).strict()]);
  const schema = {
    getBlockNumber: z.function({ input: [tag.optional()], output: number }),
    getChainTips: z.function({
      input: [],
      output: z.object({ proposed: ref, checkpointed: tip, proven: tip, finalized: tip }),
    }),
    // BlockResponse: no body unless asked for (includeTransactions).
    getBlock: z.function({
      input: [blockParameter, z.object({ includeTransactions: z.boolean().optional() }).optional()],
      output: z.object({
        number, hash: hex, checkpointNumber: number, indexWithinCheckpoint: number, archive: snapshot,
        header: z.object({ globalVariables: z.object({ blockNumber: number }).passthrough() }).passthrough(),
        body: z.object({ txEffects: z.array(z.any()) }).optional(),
      }),
    }),
    getBlockData: z.function({
      input: [blockParameter],
      output: z.object({ blockHash: hex, archive: snapshot, checkpointNumber: number }).passthrough(),
    }),
  };
  return createSafeJsonRpcClient(spec.url, schema, {
    namespaceMethods: spec.namespace ?? 'aztec',
    fetch: makeFetch([1, 2, 3], false),
  });
}

function plain(value) {
  return value === undefined ? null
    : JSON.parse(JSON.stringify(value, (_, v) => (typeof v === 'bigint' ? v.toString() : v)));
}

const client = spec.client === 'aztec.js' ? await aztecJsClient() : await foundationClient();
const settled = await Promise.allSettled(spec.calls.map(({ method, params }) => client[method](...(params ?? []))));
const out = {};
spec.calls.forEach(({ name }, i) => {
  const { status, value, reason } = settled[i];
  out[name] = status === 'fulfilled' ? { ok: true, value: plain(value) }
    : { ok: false, error: String(reason?.message ?? reason).slice(0, 2000), code: reason?.cause?.code ?? null };
});
if (unhandled.length) out._unhandled = unhandled.slice(0, 20);
process.stdout.write(JSON.stringify(out) + '\n');
process.exit(0);
