// The model lives in this worker, so that the page stays responsive while the CPU backend
// computes; every result travels to the page as a message.
import init, { Phantom } from "./pkg/phantom_wasm.js";

const wasmReady = init();
let model = null;

const post = (message) => self.postMessage(message);

self.onmessage = async ({ data }) => {
  try {
    if (data.type === "load") await load(data);
    else if (data.type === "ask") await ask(data);
  } catch (err) {
    post({ type: "error", during: data.type, message: String(err?.message ?? err) });
  }
};

// A WebGPU adapter, or null where the browser has none (or WebGPU is switched off).
async function probeWebGpu() {
  if (!navigator.gpu) return null;
  try {
    return await navigator.gpu.requestAdapter();
  } catch {
    return null;
  }
}

async function fetchOk(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response;
}

// The body of `response` as bytes, reporting each chunk's length to `onChunk`. With a declared
// length the bytes go straight into one buffer, so a large file is never held twice.
async function readBody(response, onChunk) {
  const declared = Number(response.headers.get("content-length")) || 0;
  const reader = response.body.getReader();
  let bytes = new Uint8Array(declared);
  let length = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    if (length + value.length > bytes.length) {
      const grown = new Uint8Array(Math.max(2 * bytes.length, length + value.length));
      grown.set(bytes.subarray(0, length));
      bytes = grown;
    }
    bytes.set(value, length);
    length += value.length;
    onChunk(value.length);
  }
  return length === bytes.length ? bytes : bytes.slice(0, length);
}

// The weight files of a model folder: the single file, or every shard of the index.
async function weightFiles(base) {
  const single = await fetch(base + "model.safetensors");
  if (single.ok) return [{ name: "model.safetensors", response: single }];
  const index = await fetch(base + "model.safetensors.index.json");
  if (!index.ok) {
    throw new Error(`${base} holds neither model.safetensors nor model.safetensors.index.json`);
  }
  const names = [...new Set(Object.values((await index.json()).weight_map ?? {}))].sort();
  return Promise.all(
    names.map(async (name) => ({ name, response: await fetchOk(base + name) })),
  );
}

async function load({ backend, base }) {
  await wasmReady;
  if (model) {
    model.free();
    model = null;
  }
  const adapter = backend === "cpu" ? null : await probeWebGpu();
  const order =
    backend === "webgpu" ? ["webgpu"] : backend === "cpu" ? ["cpu"] : adapter ? ["webgpu", "cpu"] : ["cpu"];
  const info = adapter?.info;
  post({
    type: "probe",
    webgpu: Boolean(adapter),
    adapter: info
      ? [info.vendor, info.architecture, info.description].filter(Boolean).join(" ") +
        (info.isFallbackAdapter ? " (software fallback adapter)" : "")
      : null,
    order,
    requested: backend,
  });

  const started = performance.now();
  const config = await (await fetchOk(base + "config.json")).text();
  const tokenizerResponse = await fetchOk(base + "tokenizer.json");
  const files = await weightFiles(base);
  const total = files.reduce((sum, f) => sum + (Number(f.response.headers.get("content-length")) || 0), 0);
  let loaded = 0;
  let reported = 0;
  const progress = (n) => {
    loaded += n;
    // A message per network chunk would flood the page; ten a second is plenty.
    const now = performance.now();
    if (now - reported > 100 || loaded === total) {
      reported = now;
      post({ type: "progress", stage: "download", done: loaded, total });
    }
  };
  const tokenizer = await readBody(tokenizerResponse, () => {});
  let buffers = [];
  for (const f of files) buffers.push(await readBody(f.response, progress));
  const downloadMs = performance.now() - started;
  post({ type: "progress", stage: "download", done: loaded, total: Math.max(total, loaded) });

  post({ type: "progress", stage: "init", done: 0, total: 1 });
  model = await Phantom.load(order, config, tokenizer, buffers, files.map((f) => f.name), (done, all) =>
    post({ type: "progress", stage: "init", done, total: all }),
  );
  // The weights now live in WebAssembly or GPU memory; let the downloaded copy go.
  buffers = null;
  post({ type: "ready", info: JSON.parse(model.info()), downloadMs, downloadBytes: loaded });
}

async function ask({ width, height, rgba, question, options }) {
  if (!model) throw new Error("no model is loaded");
  const started = performance.now();
  let firstPiece = null;
  let pieces = 0;
  const json = await model.ask(width, height, new Uint8Array(rgba), question, JSON.stringify(options), (piece) => {
    firstPiece ??= performance.now();
    pieces += 1;
    post({ type: "text", piece, pieces, sinceFirstMs: performance.now() - firstPiece });
  });
  post({ type: "done", result: JSON.parse(json), wallMs: performance.now() - started });
}
