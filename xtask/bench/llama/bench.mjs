// llama.cpp side of `cargo xtask bench-infer`: the prebuilt CPU build of node-llama-cpp on a GGUF
// of Phantom-0.5B's decoder, measured with the protocol of `phantom-infer bench`:
//
//   prefill_tokens_per_s     a prompt of --prompt-len ids evaluated into an empty context
//   decode_tokens_per_s_<C>  a prompt of C ids, then --decode-steps single-token greedy steps
//                            (the first a warm-up and not counted)
//   load_s                   loading the model file
//   peak_rss_mb              the process's peak resident memory at the end
//
// node bench.mjs --model FILE [--threads N] [--prompt-len 128] [--contexts 128,1024]
//                [--decode-steps 9]
// One JSON object goes to stdout.
import { readFileSync } from "node:fs";
import { getLlama, LlamaLogLevel } from "node-llama-cpp";

const args = Object.fromEntries(
  process.argv.slice(2).reduce((pairs, arg, i, all) => {
    if (arg.startsWith("--")) pairs.push([arg.slice(2), all[i + 1]]);
    return pairs;
  }, []),
);
const threads = Number(args.threads ?? 0) || undefined;
const promptLen = Number(args["prompt-len"] ?? 128);
const contexts = (args.contexts ?? "128,1024").split(",").map(Number);
const decodeSteps = Math.max(Number(args["decode-steps"] ?? 9), 2);

// Ids as `phantom-infer bench` draws them (the same LCG), kept inside the vocabulary.
function randomIds(n, vocab, seed) {
  let state = (BigInt(seed) * 6364136223846793005n + 1442695040888963407n) & ((1n << 64n) - 1n);
  const ids = [];
  for (let i = 0; i < n; i++) {
    state = (state * 6364136223846793005n + 1442695040888963407n) & ((1n << 64n) - 1n);
    ids.push(Number((state >> 33n) % BigInt(vocab - 1000)) + 500);
  }
  return ids;
}

function peakRssMb() {
  const line = readFileSync("/proc/self/status", "utf8")
    .split("\n")
    .find((l) => l.startsWith("VmHWM:"));
  return line ? Number(line.split(/\s+/)[1]) / 1024 : null;
}

const llama = await getLlama({
  gpu: false,
  build: "never",
  skipDownload: true,
  logLevel: LlamaLogLevel.error,
});
let start = performance.now();
const model = await llama.loadModel({ modelPath: args.model });
const report = { model: args.model, load_s: (performance.now() - start) / 1e3 };
const vocab = model.tokens.vocabularySize ?? 151936;
const biggest = Math.max(promptLen, ...contexts) + decodeSteps + 8;
const context = await model.createContext({
  contextSize: biggest,
  batchSize: Math.max(promptLen, ...contexts),
  threads: threads ?? 0,
});
report.threads = context.currentThreads ?? threads;

{
  const sequence = context.getSequence();
  start = performance.now();
  await sequence.evaluateWithoutGeneratingNewTokens(randomIds(promptLen, vocab, 1));
  report.prefill_tokens = promptLen;
  report.prefill_tokens_per_s = promptLen / ((performance.now() - start) / 1e3);
  sequence.dispose();
}

for (const ctx of contexts) {
  const sequence = context.getSequence();
  await sequence.evaluateWithoutGeneratingNewTokens(randomIds(ctx, vocab, ctx));
  let counted = 0;
  let token = 1000;
  for (let step = 0; step < decodeSteps; step++) {
    const t0 = performance.now();
    const generator = sequence.evaluate([token], { temperature: 0 });
    const next = await generator.next();
    await generator.return();
    token = next.value ?? 0;
    if (step > 0) counted += performance.now() - t0;
  }
  report[`decode_tokens_per_s_${ctx}`] = (decodeSteps - 1) / (counted / 1e3);
  sequence.dispose();
}
report.peak_rss_mb = peakRssMb();
console.log(JSON.stringify(report));
await context.dispose();
await model.dispose();
