// The page: picks a picture, sends questions to the model's worker, shows what comes back.
// `window.phantomPage` exposes the latest state for scripts (the end-to-end test reads it).

const $ = (id) => document.getElementById(id);
const worker = new Worker(new URL("./worker.js", import.meta.url), { type: "module" });
const page = { info: null, probe: null, result: null, error: null, pieces: 0 };
window.phantomPage = page;

let picture = null; // { width, height, rgba: ArrayBuffer }
let modelReady = false;
let busy = false;

const mib = (bytes) => `${(bytes / 2 ** 20).toFixed(1)} MiB`;
const ms = (t) => (t >= 1000 ? `${(t / 1000).toFixed(2)} s` : `${t.toFixed(0)} ms`);

function setStatus(state, text) {
  const status = $("status");
  // Unchanged text is not announced again to screen readers.
  if (status.dataset.state === state && status.textContent === text) return;
  status.dataset.state = state;
  status.textContent = text;
  status.setAttribute("role", state === "error" ? "alert" : "status");
}

function setFacts(list, entries) {
  list.replaceChildren(
    ...entries.flatMap(([term, value]) => {
      const dt = document.createElement("dt");
      dt.textContent = term;
      const dd = document.createElement("dd");
      dd.textContent = value;
      return [dt, dd];
    }),
  );
}

function updateAskButton() {
  $("ask").disabled = !(modelReady && picture && !busy);
}

// --- the model --------------------------------------------------------------------------

function loadModel() {
  const base = new URL($("model-url").value || "model/", location.href).href.replace(/\/?$/, "/");
  modelReady = false;
  updateAskButton();
  page.info = null;
  page.error = null;
  $("download-progress").value = 0;
  $("init-progress").value = 0;
  $("download-text").textContent = "";
  $("init-text").textContent = "";
  setFacts($("facts"), []);
  setStatus("loading", "Looking for a backend…");
  $("load").disabled = true;
  worker.postMessage({ type: "load", backend: $("backend").value, base });
}

function onProgress({ stage, done, total }) {
  const bar = $(stage === "download" ? "download-progress" : "init-progress");
  const text = $(stage === "download" ? "download-text" : "init-text");
  if (total > 0) {
    bar.max = total;
    bar.value = Math.min(done, total);
    text.textContent = `${mib(done)} of ${mib(total)}`;
  } else {
    bar.removeAttribute("value");
    text.textContent = mib(done);
  }
  setStatus("loading", stage === "download" ? "Downloading the model…" : "Loading the weights…");
}

function onReady({ info, downloadMs, downloadBytes }) {
  page.info = info;
  modelReady = true;
  $("load").disabled = false;
  $("init-progress").max = 1;
  $("init-progress").value = 1;
  const backend = info.backend === "webgpu" ? "WebGPU" : "CPU (WebAssembly SIMD)";
  const adapter = info.backend === "webgpu" ? (page.probe?.adapter ?? info.adapter) : null;
  setStatus("ready", `Ready on ${backend}.`);
  const facts = [
    ["Backend", backend + (adapter ? ` — ${adapter}` : "")],
    ["Model", `${info.architecture}, ${(info.parameters / 1e6).toFixed(1)} M parameters, ${mib(info.weight_bytes)} in f32`],
    ["Download", `${mib(downloadBytes)} in ${ms(downloadMs)}`],
    ["Initialisation", ms(info.load_ms)],
    ["WebAssembly memory", mib(info.wasm_memory_bytes)],
  ];
  if (info.limits) {
    facts.push([
      "GPU limits",
      `${mib(info.limits.maxStorageBufferBindingSize)} per storage binding, ` +
        `${mib(info.limits.maxBufferSize)} per buffer, ` +
        `${info.limits.maxComputeInvocationsPerWorkgroup} invocations per workgroup`,
    ]);
  }
  for (const reason of info.rejected) facts.push(["Not used", reason]);
  setFacts($("facts"), facts);
  updateAskButton();
}

// --- the picture ------------------------------------------------------------------------

async function usePicture(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus("error", "That is not a picture.");
    return;
  }
  try {
    // No colour management or premultiplication: the bytes stay those of the file, as the
    // native pipeline decodes them.
    const bitmap = await createImageBitmap(file, {
      colorSpaceConversion: "none",
      premultiplyAlpha: "none",
    });
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const context = canvas.getContext("2d", { willReadFrequently: true });
    context.drawImage(bitmap, 0, 0);
    const pixels = context.getImageData(0, 0, bitmap.width, bitmap.height);
    picture = { width: bitmap.width, height: bitmap.height, rgba: pixels.data.buffer };
    bitmap.close();
    const preview = $("preview");
    if (preview.src) URL.revokeObjectURL(preview.src);
    preview.src = URL.createObjectURL(file);
    preview.alt = `The chosen picture, ${file.name} (${picture.width}×${picture.height})`;
    preview.hidden = false;
    $("drop").dataset.state = "chosen";
  } catch (err) {
    picture = null;
    setStatus("error", `The picture could not be read: ${err.message ?? err}`);
  }
  updateAskButton();
}

$("image").addEventListener("change", (e) => usePicture(e.target.files[0]));
const drop = $("drop");
for (const type of ["dragenter", "dragover"]) {
  drop.addEventListener(type, (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
}
for (const type of ["dragleave", "drop"]) {
  drop.addEventListener(type, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  usePicture(e.dataTransfer.files[0]);
});

// --- questions and answers --------------------------------------------------------------

function ask() {
  if (!picture || !modelReady || busy) return;
  busy = true;
  updateAskButton();
  page.result = null;
  page.error = null;
  page.pieces = 0;
  const answer = $("answer");
  answer.textContent = "";
  answer.dataset.state = "streaming";
  answer.setAttribute("aria-busy", "true");
  $("speed").textContent = "Reading the picture…";
  setFacts($("timings"), []);
  const options = {
    max_new_tokens: Number($("max-new-tokens").value) || 256,
    max_tiles: Number($("max-tiles").value) || 6,
  };
  // The worker gets its own copy, so the same picture can be asked about again.
  const rgba = picture.rgba.slice(0);
  worker.postMessage(
    { type: "ask", width: picture.width, height: picture.height, rgba, question: $("question").value, options },
    [rgba],
  );
}

function onText({ piece, pieces, sinceFirstMs }) {
  $("answer").append(piece);
  page.pieces = pieces;
  const rate = sinceFirstMs > 0 ? ((pieces - 1) / sinceFirstMs) * 1000 : 0;
  $("speed").textContent = pieces > 1 ? `${pieces} pieces, about ${rate.toFixed(1)} tokens/s` : "Answering…";
}

function onDone({ result, wallMs }) {
  busy = false;
  page.result = result;
  const answer = $("answer");
  answer.dataset.state = "done";
  answer.setAttribute("aria-busy", "false");
  const t = result.timings;
  $("speed").textContent = `${t.decode_tokens_per_s.toFixed(1)} tokens/s while decoding`;
  setFacts($("timings"), [
    ["Backend", result.backend],
    ["Vision", t.tiles ? `${t.tiles} tile(s) in ${ms(t.vision_ms)}` : "no picture"],
    ["Prompt", `${t.prompt_tokens} tokens in ${ms(t.prefill_ms)} (${t.prefill_tokens_per_s.toFixed(1)} tokens/s)`],
    ["Answer", `${result.tokens.length} tokens, decoding at ${t.decode_tokens_per_s.toFixed(1)} tokens/s`],
    ["Total", ms(wallMs)],
  ]);
  updateAskButton();
}

function onError({ during, message }) {
  page.error = message;
  if (during === "ask") {
    busy = false;
    const answer = $("answer");
    answer.dataset.state = "error";
    answer.setAttribute("aria-busy", "false");
    $("speed").textContent = "";
  } else {
    $("load").disabled = false;
  }
  setStatus("error", message);
  updateAskButton();
}

worker.onmessage = ({ data }) => {
  switch (data.type) {
    case "probe":
      page.probe = data;
      setStatus(
        "loading",
        data.requested !== "auto"
          ? `Using ${data.order[0] === "webgpu" ? "WebGPU" : "the CPU"} as asked. Downloading…`
          : data.webgpu
            ? "WebGPU is available. Downloading…"
            : "No WebGPU adapter: using the CPU. Downloading…",
      );
      break;
    case "progress":
      onProgress(data);
      break;
    case "ready":
      onReady(data);
      break;
    case "text":
      onText(data);
      break;
    case "done":
      onDone(data);
      break;
    case "error":
      onError(data);
      break;
  }
};
worker.onerror = (e) => onError({ during: "load", message: `The model's worker failed: ${e.message}` });

$("load-form").addEventListener("submit", (e) => {
  e.preventDefault();
  loadModel();
});
$("ask-form").addEventListener("submit", (e) => {
  e.preventDefault();
  ask();
});

// `?model=URL&backend=auto|webgpu|cpu` preselect; the model loads on opening the page.
const params = new URLSearchParams(location.search);
if (params.has("model")) $("model-url").value = params.get("model");
if (["auto", "webgpu", "cpu"].includes(params.get("backend"))) $("backend").value = params.get("backend");
loadModel();
