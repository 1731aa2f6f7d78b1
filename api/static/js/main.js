// The EBCA Serve page: the generate form with EBCA controls, Compare (EBCA off / on, same seed), live job
// cards, the edit panel and the caller's history. Only the public REST API and the event stream.

import { ApiError, api, storeKey, storedKey, takeKeyFromLocation } from "./api.js";
import { $, $$, clearErrors, compact, el, fieldValue, showError } from "./dom.js";
import { EditPanel } from "./edit.js";
import { jobCard, renderHistory } from "./jobs.js";

const state = { models: [], weights: new Map() };
const results = $("#results");
const form = $("#generate-form");
const formError = $("#form-error");

function banner(message) {
  const box = $("#banner");
  box.textContent = message || "";
  box.hidden = !message;
}

async function checkKey() {
  const status = $("#key-status");
  try {
    const me = await api.me();
    status.textContent = me.auth === "off" ? "no key needed" : `key: ${me.name} (${me.role})`;
    status.dataset.ok = "true";
    banner("");
    return true;
  } catch (error) {
    status.dataset.ok = "false";
    status.textContent = error instanceof ApiError && error.status === 401 ? "key needed" : error.message;
    banner(
      error instanceof ApiError && error.status === 401
        ? `${error.message}. Enter an API key above (scripts/serve.sh prints one).`
        : `The API is not answering: ${error.message}`,
    );
    return false;
  }
}

async function loadModels() {
  const { models } = await api.models();
  state.models = models;
  const select = $("#model");
  select.replaceChildren(...models.map((m) => el("option", { value: m.id, text: m.default ? `${m.id} (default)` : m.id })));
  const chosen = models.find((m) => m.default) || models[0];
  if (chosen) select.value = chosen.id;
  showModelDefaults();
}

function modelDefaults() {
  const model = state.models.find((m) => m.id === $("#model").value);
  return model ? model.defaults || {} : {};
}

/** The model's defaults as placeholders: a blank field takes them (the worker fills them in). */
function showModelDefaults() {
  const defaults = modelDefaults();
  for (const name of ["steps", "guidance_scale", "width", "height"]) {
    $(`#${name}`).placeholder = defaults[name] ?? "model default";
  }
  const scheduler = $("#scheduler option[value='']");
  scheduler.textContent = defaults.scheduler ? `model default (${defaults.scheduler})` : "model default";
  edit.refreshDefaults();
}

// -- token weights: click a word of the prompt, choose its weight ------------------------------------

function renderWords() {
  const words = [...new Set($("#prompt").value.toLowerCase().match(/[\p{L}\p{N}]+/gu) || [])];
  $("#words").replaceChildren(
    ...words.map((word) =>
      el("button", {
        type: "button",
        class: state.weights.has(word) ? "word weighted" : "word",
        "aria-pressed": String(state.weights.has(word)),
        text: word,
        onclick: () => toggleWeight(word),
      }),
    ),
  );
}

function toggleWeight(word) {
  if (state.weights.has(word)) state.weights.delete(word);
  else state.weights.set(word, "2.5");
  renderWeights();
  renderWords();
}

function renderWeights() {
  $("#weights").replaceChildren(
    ...[...state.weights].map(([word, weight]) => {
      const input = el("input", { inputmode: "decimal", value: weight, "aria-label": `weight of ${word}`, "data-field": `energy.token_weights.${word}` });
      input.addEventListener("input", () => state.weights.set(word, input.value));
      return el("label", { class: "weight" }, `${word} ×`, input);
    }),
  );
}

// -- the request body -------------------------------------------------------------------------------

function energy() {
  if (!$("#ebca-on").checked) return undefined;
  const kind = $("#schedule_kind").value;
  const value = fieldValue($("#schedule_value"));
  const schedule = value === undefined ? { kind } : { kind, [kind === "linear" || kind === "exp" ? "ratio" : "tau"]: value };
  const token_weights = Object.fromEntries([...state.weights].map(([word, weight]) => [word, Number(weight)]));
  return compact({
    gamma_attn: fieldValue($("#gamma_attn")),
    gamma_norm: fieldValue($("#gamma_norm")),
    schedule,
    token_weights,
  });
}

function generateBody() {
  const body = {};
  for (const input of $$("[data-field]", form)) {
    const name = input.dataset.field;
    if (name.includes(".") || input.closest("#weights")) continue;
    body[name] = input.tagName === "SELECT" ? input.value || undefined : fieldValue(input);
  }
  body.energy = energy();
  return compact(body);
}

// -- submitting -------------------------------------------------------------------------------------

function follow(job, label) {
  const { done } = jobCard(results, job, { label, onEdit: (j, image, blob) => edit.useResult(j, image, blob) });
  $(".hint", results)?.remove();
  done.then(refreshHistory, () => {});
  return done;
}

async function submit(run) {
  clearErrors(formError, form);
  try {
    await run();
  } catch (error) {
    showError(formError, form, error);
  }
}

async function generate() {
  const body = generateBody();
  const job = await api.generate(body);
  follow(job, `${body.prompt} · EBCA ${body.energy ? "on" : "off"}`);
}

/** The same request and seed twice, EBCA off and on, shown side by side. */
async function compare() {
  const body = { ...generateBody(), num_images: 1 };
  if (body.seed === undefined) body.seed = Math.floor(Math.random() * 2 ** 31);
  const on = { ...body, energy: energy() || { gamma_attn: 0.01, gamma_norm: 0.02 } };
  const off = { ...body };
  delete off.energy;
  const [jobOff, jobOn] = [await api.generate(off), await api.generate(on)];
  const pair = el("div", { class: "compare", "aria-label": `Compare, seed ${body.seed}` });
  results.prepend(pair);
  $(".hint", results)?.remove();
  for (const [job, label] of [[jobOff, "EBCA off"], [jobOn, "EBCA on"]]) {
    const { done } = jobCard(pair, job, { label: `${label} · seed ${body.seed}`, onEdit: (j, i, b) => edit.useResult(j, i, b) });
    done.then(refreshHistory, () => {});
  }
  pair.append(...[...pair.children].reverse()); // off on the left
}

async function refreshHistory() {
  try {
    await renderHistory($("#history"), showJob);
  } catch (error) {
    $("#history").replaceChildren(el("li", { class: "form-error", text: error.message }));
  }
}

async function showJob(job) {
  follow(await api.job(job.id));
}

// -- start ------------------------------------------------------------------------------------------

const edit = new EditPanel({ onJob: (job, label) => follow(job, label), modelDefaults });

async function start() {
  takeKeyFromLocation();
  $("#api-key").value = storedKey();
  $("#key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    storeKey($("#api-key").value.trim());
    if (await checkKey()) await Promise.all([loadModels(), refreshHistory()]);
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    submit(generate);
  });
  $("#compare-btn").addEventListener("click", () => submit(compare));
  $("#prompt").addEventListener("input", renderWords);
  $("#model").addEventListener("change", showModelDefaults);
  $("#history-refresh").addEventListener("click", refreshHistory);
  renderWords();
  if (await checkKey()) await Promise.all([loadModels(), refreshHistory()]);
}

start();
