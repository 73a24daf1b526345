// backdoor-seal: renders Seal Evaluate's and Seal Sanitize's reports as tables inside the node.
import { app } from "../../../scripts/app.js";

const ROWS = [
  ["trigger", "trigger", (v) => v],
  ["asr_before", "attack success, original", (v) => `${(100 * v).toFixed(0)}%`],
  ["asr_after", "attack success, after removal", (v) => `${(100 * v).toFixed(0)}%`],
  ["clean_fidelity_ssim", "clean fidelity, SSIM", (v) => v.toFixed(3)],
  ["clean_fidelity_psnr", "clean fidelity, PSNR", (v) => `${v.toFixed(1)} dB`],
  ["clip_image_similarity", "CLIP image similarity", (v) => v.toFixed(3)],
  ["prompts", "triggered prompts", (v) => String(v)],
  ["judge", "judged by", (v) => v],
  ["seconds", "time", (v) => `${v.toFixed(0)} s`],
];

const STYLE = `
.seal-report table { width: 100%; border-collapse: collapse; font: 12px sans-serif; color: var(--input-text, #ddd); }
.seal-report td { padding: 2px 6px; border-bottom: 1px solid rgba(127, 127, 127, 0.3); vertical-align: top; }
.seal-report td:first-child { opacity: 0.75; white-space: nowrap; }
.seal-report tr.seal-good td:last-child { color: #2ecc71; font-weight: bold; }
.seal-report tr.seal-bad td:last-child { color: #e74c3c; font-weight: bold; }
`;

export function reportTable(report) {
  const table = document.createElement("table");
  for (const [key, label, format] of ROWS) {
    const value = report[key];
    if (value === null || value === undefined) continue;
    const row = table.insertRow();
    row.dataset.key = key;
    if (key === "asr_after") row.className = value <= 0.05 ? "seal-good" : "seal-bad";
    row.insertCell().textContent = label;
    row.insertCell().textContent = format(value);
  }
  return table;
}

const pct = (v) => `${(100 * v).toFixed(0)}%`;

// Seal Sanitize: one row per trigger taken (fired on what share of probes before / after cleaning), then
// what remains and the clean fidelity. Red: still fires after cleaning, or not confirmed clean.
export function sanitizeTable(report) {
  const table = document.createElement("table");
  const add = (label, value, cls) => {
    const row = table.insertRow();
    if (cls) row.className = cls;
    row.insertCell().textContent = label;
    row.insertCell().textContent = value;
    return row;
  };
  const taken = (report.candidates || []).filter((c) => c.taken);
  // the verdict first: clean only when the independent residual check agreed
  if (report.verdict) add("verdict", report.verdict, report.verdict === "clean" ? "seal-good" : "seal-bad");
  add("triggers found", taken.length ? String(taken.length) : "none fired");
  for (const c of taken) {
    const after = c.after ? pct(c.after.rate) : "not re-tested";
    const row = add(c.readable, `${pct(c.before.rate)} -> ${after}`, c.after?.fires ? "seal-bad" : "seal-good");
    row.dataset.trigger = c.readable;
  }
  if (taken.length) {
    const remaining = report.remaining || [];
    add("still firing", remaining.length ? `${remaining.length}` : "none", remaining.length ? "seal-bad" : "seal-good");
  }
  const fix = report.unlearn || {};
  if (fix.method) add("fix", fix.method === "revert" ? "edit reverted against the base" : `${fix.method}, ${fix.scope}`);
  if (report.clean_fidelity_ssim !== null && report.clean_fidelity_ssim !== undefined)
    add("clean fidelity, SSIM", report.clean_fidelity_ssim.toFixed(3));
  if (report.flagged_after) add("re-check flags", String(report.flagged_after.length));
  for (const why of report.remains || []) add("not confirmed clean", why, "seal-bad");
  return table;
}

const TABLES = { SealEvaluate: [reportTable, 190], SealSanitize: [sanitizeTable, 220] };

app.registerExtension({
  name: "backdoor_seal.report",
  setup() {
    const style = document.createElement("style");
    style.textContent = STYLE;
    document.head.appendChild(style);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const entry = TABLES[nodeData.name];
    if (!entry) return;
    const [render, minHeight] = entry;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const report = message?.seal_report?.[0];
      if (!report) return;
      if (!this.sealReport) {
        const element = document.createElement("div");
        element.className = "seal-report";
        this.sealReport = this.addDOMWidget("seal_report", "seal_report", element, {
          serialize: false,
          getMinHeight: () => minHeight,
        });
      }
      this.sealReport.element.replaceChildren(render(report));
      this.setDirtyCanvas(true, true);
    };
  },
});
