// Small DOM helpers shared by the page's modules.

/** Make an element: el("p", {class: "x", text: "hi"}, child, ...). */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

export const $ = (selector, root = document) => root.querySelector(selector);
export const $$ = (selector, root = document) => [...root.querySelectorAll(selector)];

/** A form value as the API expects it: "" is left out (the server's default applies), a number is
 * sent as a number, anything else as typed, so that the server names the field that is wrong. */
export function fieldValue(input) {
  const raw = input.value.trim();
  if (raw === "") return undefined;
  if (input.inputMode === "numeric" || input.inputMode === "decimal") {
    const number = Number(raw);
    return Number.isFinite(number) ? number : raw;
  }
  return raw;
}

/** Drop the undefined entries of a body. */
export function compact(body) {
  return Object.fromEntries(Object.entries(body).filter(([, value]) => value !== undefined));
}

/** Show an API error under a form: the message, and the input of the field it names marked invalid
 * (the input whose data-field is the field, or the longest one that is a prefix of it). */
export function showError(box, root, error) {
  clearErrors(box, root);
  const field = error.field;
  const where = field ? ` (field ${field})` : "";
  box.textContent = `${error.message || error}${where}`;
  box.hidden = false;
  if (!field) return;
  let best = null;
  for (const input of $$("[data-field]", root)) {
    const name = input.dataset.field;
    if ((field === name || field.startsWith(`${name}.`)) && (!best || name.length > best.dataset.field.length)) {
      best = input;
    }
  }
  if (best) {
    best.classList.add("invalid");
    best.setAttribute("aria-invalid", "true");
    best.setAttribute("aria-describedby", box.id);
    best.focus();
  }
}

export function clearErrors(box, root) {
  box.hidden = true;
  box.textContent = "";
  for (const input of $$(".invalid", root)) {
    input.classList.remove("invalid");
    input.removeAttribute("aria-invalid");
  }
}
