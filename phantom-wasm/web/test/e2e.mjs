// One end-to-end run of the page in headless Chromium: open it, wait for the model, choose the
// picture through the file input, ask, and wait for the streamed answer. Prints one JSON line
// with what the page produced; `cargo xtask test-web` compares it with the native CLI.
//
//   node e2e.mjs --url http://127.0.0.1:PORT/ --image PATH --prompt TEXT --max-new-tokens N
//                [--asks 2] [--webgpu] [--chromium /usr/bin/chromium] [--timeout-s 600]
//
// With `--asks N` the same question is asked N times on the loaded page: the first answer pays
// for compiling the GPU kernels, the later ones show the steady speed. Every answer is reported.
import { parseArgs } from "node:util";
import { chromium } from "playwright-core";

const { values: opt } = parseArgs({
  options: {
    url: { type: "string" },
    image: { type: "string" },
    prompt: { type: "string", default: "Describe the image in detail." },
    "max-new-tokens": { type: "string", default: "16" },
    asks: { type: "string", default: "1" },
    webgpu: { type: "boolean", default: false },
    chromium: { type: "string", default: "/usr/bin/chromium" },
    "timeout-s": { type: "string", default: "600" },
  },
});
const timeout = Number(opt["timeout-s"]) * 1000;

// As measured on this kind of machine: headless, no sandbox (CI runs as root), no GPU process
// work beyond what WebGPU needs; `--enable-unsafe-webgpu` exposes Chromium's software
// (SwiftShader) WebGPU adapter where there is no GPU.
const args = [
  "--disable-gpu",
  "--disable-quic",
  "--no-first-run",
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];
if (opt.webgpu) args.push("--enable-unsafe-webgpu");

const console_ = [];
const started = Date.now();
const browser = await chromium.launch({
  executablePath: opt.chromium,
  headless: true,
  chromiumSandbox: false,
  args,
});
let report;
try {
  const page = await browser.newPage();
  // Clicks and fills fail fast; only loading and answering get the long limit.
  page.setDefaultTimeout(30_000);
  page.on("console", (m) => console_.push(`${m.type()}: ${m.text()}`));
  page.on("pageerror", (e) => console_.push(`pageerror: ${e.message}`));

  await page.goto(new URL("?backend=auto", opt.url).href);
  await page.waitForSelector('#status[data-state="ready"], #status[data-state="error"]', { timeout });
  const loadError = await page.evaluate(() => window.phantomPage.error);
  if (loadError) throw new Error(`loading failed: ${loadError}`);
  const loadedMs = Date.now() - started;

  await page.setInputFiles("#image", opt.image);
  await page.fill("#question", opt.prompt);
  await page.click("summary");
  await page.fill("#max-new-tokens", opt["max-new-tokens"]);
  await page.waitForFunction(() => !document.getElementById("ask").disabled);
  // Record every change of the answer box, to see that the answer arrived piece by piece.
  await page.evaluate(() => {
    window.__answerUpdates = 0;
    new MutationObserver((records) => {
      window.__answerUpdates += records.length;
    }).observe(document.getElementById("answer"), { childList: true, characterData: true, subtree: true });
  });
  const answers = [];
  for (let i = 0; i < Math.max(1, Number(opt.asks)); i++) {
    await page.waitForFunction(() => !document.getElementById("ask").disabled);
    await page.evaluate(() => {
      window.__answerUpdates = 0;
    });
    const asked = Date.now();
    await page.click("#ask");
    await page.waitForSelector('#answer[data-state="done"], #answer[data-state="error"]', { timeout });
    const state = await page.evaluate(() => ({
      page: window.phantomPage,
      shown: document.getElementById("answer").textContent,
      updates: window.__answerUpdates,
    }));
    if (state.page.error) throw new Error(`answering failed: ${state.page.error}`);
    answers.push({
      answer: state.page.result.answer,
      shown: state.shown,
      tokens: state.page.result.tokens,
      pieces: state.page.pieces,
      updates: state.updates,
      timings: state.page.result.timings,
      backend: state.page.result.backend,
      ask_ms: Date.now() - asked,
    });
  }
  const info = await page.evaluate(() => window.phantomPage.info);
  report = { ok: true, webgpu_flag: opt.webgpu, ...answers.at(-1), answers, info, load_ms: loadedMs };
} catch (err) {
  report = { ok: false, webgpu_flag: opt.webgpu, error: String(err?.message ?? err) };
} finally {
  await browser.close();
}
report.console = console_.slice(-40);
console.log(JSON.stringify(report));
process.exit(report.ok ? 0 : 1);
