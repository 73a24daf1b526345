// backdoor-seal: renders Seal Evaluate's report as a table inside the node.
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

app.registerExtension({
  name: "backdoor_seal.report",
  setup() {
    const style = document.createElement("style");
    style.textContent = STYLE;
    document.head.appendChild(style);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== "SealEvaluate") return;
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
          getMinHeight: () => 190,
        });
      }
      this.sealReport.element.replaceChildren(reportTable(report));
      this.setDirtyCanvas(true, true);
    };
  },
});
