// Job cards: live progress from the event stream, cancel, and the result images with their settings.

import { api, follow, imageBlob } from "./api.js";
import { el } from "./dom.js";

const TERMINAL = new Set(["succeeded", "failed", "canceled"]);

/** The card of one job, updated until it ends. `onEdit(job, image, blob)` is offered for each image.
 * Resolves with the final job record. */
export function jobCard(container, job, { label, onEdit } = {}) {
  const status = el("p", { class: "status", role: "status" });
  const bar = el("progress", { max: 1, value: 0, "aria-label": "progress" });
  const cancel = el("button", { type: "button", class: "cancel", text: "Cancel" });
  const images = el("div", { class: "images" });
  const card = el(
    "article",
    { class: "job", "data-job-id": job.id, "data-status": job.status },
    el("h3", { text: label || titleOf(job) }),
    status,
    bar,
    cancel,
    images,
  );
  container.prepend(card);
  const update = (state) => {
    card.dataset.status = state.status;
    status.textContent = describe(state);
    const progress = state.progress || {};
    bar.max = Math.max(progress.total || 1, 1);
    bar.value = state.status === "succeeded" ? bar.max : progress.step || 0;
    cancel.disabled = TERMINAL.has(state.status);
  };
  update(job);
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      update(await api.cancel(job.id));
    } catch (error) {
      status.textContent = `cancel: ${error.message}`;
    }
  });
  const done = follow(job.id, update)
    .then(async (final) => {
      update(final);
      if (final.status === "succeeded") await showImages(images, final, onEdit);
      return final;
    })
    .catch((error) => {
      status.textContent = `lost track of the job: ${error.message}`;
      throw error;
    });
  return { card, done };
}

function titleOf(job) {
  const request = job.request || {};
  if (job.mode === "synthetic") return `synthetic edit of ${request.source_job_id}`;
  return request.prompt || request.source_prompt || job.mode || job.kind;
}

export function describe(state) {
  const progress = state.progress || {};
  switch (state.status) {
    case "queued":
      return state.queue_position === null || state.queue_position === undefined
        ? "queued"
        : `queued, position ${state.queue_position + 1}`;
    case "running":
      return `${progress.stage || "running"} ${progress.step || 0}/${progress.total || "?"}`;
    case "succeeded":
      return `done (${progress.total || 0} steps)`;
    case "failed":
      return `failed: ${state.error ? state.error.message : "unknown error"}`;
    case "canceled":
      return "canceled";
    default:
      return state.status;
  }
}

async function showImages(container, job, onEdit) {
  for (const image of job.result.images) {
    const blob = await imageBlob(image.url);
    const src = URL.createObjectURL(blob);
    const settings = el("pre", { text: JSON.stringify(image.settings, null, 2) });
    const extension = image.content_type.split("/")[1];
    const figure = el(
      "figure",
      { class: "result" },
      el("img", { src, alt: `image ${image.index} of job ${job.id}, seed ${image.seed}`, class: "pixelated" }),
      el(
        "figcaption",
        {},
        el("span", { text: `seed ${image.seed} · ${image.width}×${image.height}` }),
        el("a", { href: src, download: `${job.id}-${image.index}.${extension}`, text: "Download" }),
        onEdit
          ? el("button", { type: "button", class: "edit-this", text: "Edit this", onclick: () => onEdit(job, image, blob) })
          : null,
        el("details", {}, el("summary", { text: "Settings" }), settings),
      ),
    );
    container.append(figure);
  }
}

/** The caller's jobs, newest first, with a thumbnail of each succeeded one. */
export async function renderHistory(list, onShow) {
  const page = await api.jobs(20);
  list.replaceChildren();
  for (const job of page.jobs) {
    const item = el(
      "li",
      { "data-job-id": job.id },
      el("span", { class: "history-status", "data-status": job.status, text: job.status }),
      el("span", { class: "history-title", text: titleOf(job) }),
      el("button", { type: "button", text: "Show", onclick: () => onShow(job) }),
    );
    list.append(item);
    const first = job.result && job.result.images[0];
    if (first) {
      imageBlob(first.url)
        .then((blob) => item.prepend(el("img", { src: URL.createObjectURL(blob), alt: "", class: "thumb pixelated" })))
        .catch(() => {});
    }
  }
  if (!page.jobs.length) list.append(el("li", { class: "hint", text: "No jobs yet." }));
}
