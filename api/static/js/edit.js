// The edit panel: synthetic edits of a generate job, inpainting with a mask painted on a canvas, and
// real-image edits of an upload. Editorial prompts start from the model's edit defaults (GET /models).

import { api } from "./api.js";
import { $, $$, clearErrors, compact, fieldValue, showError } from "./dom.js";

const DISPLAY = 256; // the canvas's size on screen, in CSS pixels

export class EditPanel {
  constructor({ onJob, modelDefaults }) {
    this.onJob = onJob; // (job, label) => void: a submitted job to follow
    this.modelDefaults = modelDefaults; // () => the chosen model's defaults
    this.sourceJob = null;
    this.image = null; // an ImageBitmap to inpaint
    this.error = $("#edit-error");
    this.root = $("#edit-panel");
    this.canvas = $("#paint-canvas");
    this.mask = document.createElement("canvas");
    this.painting = false;
    this.setUpTabs();
    this.setUpPainting();
    for (const button of $$("[data-add-edit]")) {
      button.addEventListener("click", () => this.addEditRow($(`#${button.dataset.addEdit}`)));
    }
    this.addEditRow($("#synthetic-edits"), { prompt: "a blue circle" });
    this.addEditRow($("#real-edits"), { prompt: "a blue circle" });
    $("#synthetic-btn").addEventListener("click", () => this.submit(() => this.synthetic()));
    $("#inpaint-btn").addEventListener("click", () => this.submit(() => this.inpaint()));
    $("#real-btn").addEventListener("click", () => this.submit(() => this.real()));
    $("#inpaint-upload").addEventListener("change", (event) => this.loadUpload(event.target.files[0]));
    $("#clear-mask").addEventListener("click", () => this.clearMask());
  }

  setUpTabs() {
    for (const tab of $$("[role=tab]", this.root)) tab.addEventListener("click", () => this.showTab(tab.id));
  }

  showTab(id) {
    for (const tab of $$("[role=tab]", this.root)) {
      const selected = tab.id === id;
      tab.setAttribute("aria-selected", String(selected));
      $(`#${tab.getAttribute("aria-controls")}`).hidden = !selected;
    }
  }

  /** "Edit this" on a result: a synthetic edit of its job (generate jobs) and the image to inpaint. */
  async useResult(job, image, blob) {
    this.sourceJob = job.kind === "generate" ? job.id : null;
    $("#synthetic-source").textContent = this.sourceJob || "(only generate jobs)";
    $("#edit-hint").textContent = `Editing image ${image.index} of job ${job.id} (seed ${image.seed}).`;
    // The tab first: a tab the user picks while the image decodes must not be switched away from.
    this.showTab(this.sourceJob ? "tab-synthetic" : "tab-inpaint");
    const reduced = window.matchMedia("(prefers-reduced-motion: reduce)").matches;
    this.root.scrollIntoView({ behavior: reduced ? "auto" : "smooth", block: "start" });
    await this.loadImage(blob);
  }

  async loadUpload(file) {
    if (file) await this.loadImage(file);
  }

  async loadImage(blob) {
    delete this.canvas.dataset.ready;
    this.image = await createImageBitmap(blob);
    this.mask.width = this.image.width;
    this.mask.height = this.image.height;
    this.clearMask();
    this.canvas.dataset.ready = "true"; // the image is drawn and can be painted on
  }

  clearMask() {
    const context = this.mask.getContext("2d");
    context.fillStyle = "#000";
    context.fillRect(0, 0, this.mask.width, this.mask.height);
    this.redraw();
  }

  redraw() {
    const context = this.canvas.getContext("2d");
    context.imageSmoothingEnabled = false;
    context.clearRect(0, 0, DISPLAY, DISPLAY);
    if (!this.image) return;
    context.drawImage(this.image, 0, 0, DISPLAY, DISPLAY);
    // The painted region, tinted over the image (white mask pixels = repaint).
    const overlay = document.createElement("canvas");
    overlay.width = this.mask.width;
    overlay.height = this.mask.height;
    const o = overlay.getContext("2d");
    const pixels = this.mask.getContext("2d").getImageData(0, 0, this.mask.width, this.mask.height);
    const tint = o.createImageData(pixels.width, pixels.height);
    for (let i = 0; i < pixels.data.length; i += 4) {
      const painted = pixels.data[i] > 127;
      tint.data.set(painted ? [255, 0, 128, 140] : [0, 0, 0, 0], i);
    }
    o.putImageData(tint, 0, 0);
    context.drawImage(overlay, 0, 0, DISPLAY, DISPLAY);
  }

  setUpPainting() {
    const paint = (event) => {
      if (!this.painting || !this.image) return;
      const box = this.canvas.getBoundingClientRect();
      const x = ((event.clientX - box.left) / box.width) * this.mask.width;
      const y = ((event.clientY - box.top) / box.height) * this.mask.height;
      const radius = (Number($("#brush").value) / DISPLAY) * this.mask.width * 0.5;
      const context = this.mask.getContext("2d");
      context.fillStyle = "#fff";
      context.beginPath();
      context.arc(x, y, Math.max(radius, 0.5), 0, 2 * Math.PI);
      context.fill();
      this.redraw();
    };
    this.canvas.addEventListener("pointerdown", (event) => {
      this.painting = true;
      this.canvas.setPointerCapture(event.pointerId);
      paint(event);
    });
    this.canvas.addEventListener("pointermove", paint);
    for (const name of ["pointerup", "pointercancel"]) {
      this.canvas.addEventListener(name, () => {
        this.painting = false;
      });
    }
  }

  addEditRow(container, values = {}) {
    const row = $("#edit-row").content.firstElementChild.cloneNode(true);
    const index = container.children.length;
    $(".edit-prompt", row).value = values.prompt || "";
    $(".edit-prompt", row).dataset.field = `edits.${index}.prompt`;
    $(".edit-alpha", row).dataset.field = `edits.${index}.alpha`;
    $(".edit-alpha-tau", row).dataset.field = `edits.${index}.alpha_tau`;
    $(".edit-direction", row).addEventListener("change", () => this.fillDefaults(row));
    $(".remove-edit", row).addEventListener("click", () => row.remove());
    container.append(row);
    this.fillDefaults(row);
  }

  /** Pre-fill a row with the model's edit defaults for its mode and direction (GET /models:
   * defaults.edit.{synthetic|real}.{and|not}); where the model has none the fields stay blank and the
   * server's defaults apply. */
  fillDefaults(row) {
    const mode = row.closest("#real-edits") ? "real" : "synthetic";
    const edit = (this.modelDefaults() || {}).edit || {};
    const defaults = (edit[mode] || {})[$(".edit-direction", row).value] || {};
    $(".edit-alpha", row).value = defaults.alpha ?? "";
    $(".edit-alpha-tau", row).value = defaults.alpha_tau ?? "";
  }

  /** The model changed (or its defaults arrived): every row takes its defaults. */
  refreshDefaults() {
    for (const row of $$(".edit-row", this.root)) this.fillDefaults(row);
  }

  edits(container) {
    return $$(".edit-row", container).map((row) =>
      compact({
        prompt: fieldValue($(".edit-prompt", row)),
        direction: $(".edit-direction", row).value,
        alpha: fieldValue($(".edit-alpha", row)),
        alpha_tau: fieldValue($(".edit-alpha-tau", row)),
      }),
    );
  }

  async submit(make) {
    clearErrors(this.error, this.root);
    try {
      const [job, label] = await make();
      this.onJob(job, label);
    } catch (error) {
      showError(this.error, this.root, error);
    }
  }

  synthetic() {
    if (!this.sourceJob) throw new Error("choose \"Edit this\" on a generated image first");
    const body = { mode: "synthetic", source_job_id: this.sourceJob, edits: this.edits($("#synthetic-edits")) };
    return api.edit(body).then((job) => [job, `synthetic edit: ${body.edits.map((e) => e.prompt).join(", ")}`]);
  }

  async inpaint() {
    if (!this.image) throw new Error("load an image first (upload one, or \"Edit this\" on a result)");
    const image = await canvasBlob(this.image);
    const mask = await new Promise((resolve) => this.mask.toBlob(resolve, "image/png"));
    const body = compact({ mode: "inpaint", prompt: fieldValue($("#inpaint-prompt")) });
    const job = await api.editUpload(body, { image, mask });
    return [job, `inpaint: ${body.prompt}`];
  }

  async real() {
    const file = $("#real-upload").files[0];
    if (!file) throw new Error("choose an image file to edit");
    const body = compact({ mode: "real", source_prompt: fieldValue($("#source-prompt")), edits: this.edits($("#real-edits")) });
    const job = await api.editUpload(body, { image: file });
    return [job, `real edit of ${file.name}`];
  }
}

function canvasBlob(bitmap) {
  const canvas = document.createElement("canvas");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  canvas.getContext("2d").drawImage(bitmap, 0, 0);
  return new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
}
