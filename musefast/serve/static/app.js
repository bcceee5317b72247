// The musefast web page: one form over the server's OpenAI-compatible images API.
// No build step and nothing fetched from elsewhere: the page must work on an offline box.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "musefast.apiKey";  // sessionStorage: a key never outlives the tab

const state = { models: [], controller: null };

// ---- talking to the server -------------------------------------------------------------

function headers(json) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}

// OpenAI's error shape is {"error": {"message", "type", "param", "code"}}; anything else (a proxy's
// HTML page, a dropped connection) still becomes one readable line.
async function errorFrom(response) {
  let detail = null;
  try {
    detail = (await response.json()).error;
  } catch (_) { /* not JSON: fall back to the status line */ }
  if (response.status === 401) revealKeyField();
  if (!detail || !detail.message) {
    return new ApiError(`The server answered ${response.status} ${response.statusText}`.trim(), response.status);
  }
  return new ApiError(describeError(detail), response.status);
}

function describeError(detail) {
  let text = detail.message;
  if (detail.param && !text.includes(detail.param)) text += ` (field: ${detail.param})`;
  return text;
}

function revealKeyField() {
  const field = $("api-key-field");
  if (field.hidden) {
    field.hidden = false;
    $("api-key").focus();
  }
}

// Server-sent events over a POST: EventSource can only GET, so the stream is read with fetch and
// split into events here (blank line between events; `event:` and `data:` fields per line).
async function* serverSentEvents(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = /\r\n\r\n|\n\n|\r\r/.exec(buffer))) {
      const event = parseEvent(buffer.slice(0, end.index));
      buffer = buffer.slice(end.index + end[0].length);
      if (event) yield event;
    }
  }
  const last = parseEvent(buffer);
  if (last) yield last;
}

function parseEvent(block) {
  let name = "message";
  const data = [];
  for (const line of block.split(/\r\n|\n|\r/)) {
    if (!line || line.startsWith(":")) continue;  // a comment (keep-alive)
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { name, data: data.join("\n") } : null;
}

// ---- models and sizes -------------------------------------------------------------------

// /v1/models lists OpenAI's fields; musefast adds what its page needs when it knows it
// (`sizes`: ["WxH", ...] or `size`: "WxH"). Without either, the size is left to the model.
function sizesOf(model) {
  if (Array.isArray(model.sizes) && model.sizes.length) return model.sizes.map(String);
  if (typeof model.size === "string" && model.size) return [model.size];
  if (model.width && model.height) return [`${model.width}x${model.height}`];
  return [];
}

async function loadModels() {
  const note = $("server-model");
  let response;
  try {
    response = await fetch("v1/models", { headers: headers(false) });
  } catch (err) {
    note.textContent = "The server cannot be reached.";
    return;
  }
  if (!response.ok) {
    const err = await errorFrom(response);
    note.textContent = response.status === 401 ? "Enter the server's API key to start." : err.message;
    return;
  }
  state.models = (await response.json()).data || [];
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
  select.disabled = state.models.length < 2;
  note.textContent = state.models.length ? `Model: ${state.models.map((m) => m.id).join(", ")}` : "The server lists no model.";
  fillSizes();
}

function fillSizes() {
  const model = state.models.find((m) => m.id === $("model").value);
  const sizes = model ? sizesOf(model) : [];
  const select = $("size");
  select.replaceChildren(...(sizes.length ? sizes.map((s) => new Option(s, s)) : [new Option("model's size", "")]));
  select.disabled = sizes.length < 2;
}

// A server that lists no size still says, with each image, the size it made: name the
// "model's size" choice by it.
function learnSize(size) {
  const select = $("size");
  if (size && select.options.length === 1 && select.options[0].value === "") {
    select.options[0].textContent = `${size} (model's size)`;
  }
}

// ---- the form ---------------------------------------------------------------------------

function wholeNumber(id, label, { min, allowBlank }) {
  const text = $(id).value.trim();
  if (text === "" && allowBlank) return undefined;
  const value = Number(text);
  if (text === "" || !Number.isInteger(value) || value < min) {
    throw new ApiError(`${label} must be a whole number ≥ ${min}${allowBlank ? " (or blank)" : ""}, got "${text}"`);
  }
  return value;
}

function readSettings() {
  const prompt = $("prompt").value.trim();
  if (!prompt) throw new ApiError("Type a prompt first.");
  if ($("seed").value.trim() === "") $("seed").value = String(Math.floor(Math.random() * 2 ** 31));
  const settings = {
    prompt,
    negative_prompt: $("negative-prompt").value.trim() || undefined,
    model: $("model").value || undefined,
    size: $("size").value || undefined,
    seed: wholeNumber("seed", "Seed", { min: 0 }),
    num_inference_steps: wholeNumber("steps", "Steps", { min: 1, allowBlank: true }),
    partial_images: Number($("partial-images").value),
  };
  const guidance = $("guidance").value.trim();
  if (guidance !== "") {
    settings.guidance_scale = Number(guidance);
    if (!Number.isFinite(settings.guidance_scale) || settings.guidance_scale < 0) {
      throw new ApiError(`Guidance must be a number ≥ 0 (or blank), got "${guidance}"`);
    }
  }
  return settings;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("stop").disabled = !busy;
  $("generate-form").setAttribute("aria-busy", String(busy));
}

function mimeOf(format) {
  return { jpeg: "image/jpeg", webp: "image/webp" }[format] || "image/png";
}

function blobFrom(b64, mime) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  return new Blob([bytes], { type: mime });
}

function showPreview(src, alt) {
  const img = $("preview");
  img.src = src;
  img.alt = alt;
  img.hidden = false;
}

async function generate(event) {
  event.preventDefault();
  showError("");
  let settings;
  try {
    settings = readSettings();
  } catch (err) {
    showError(err.message);
    return;
  }
  const body = { ...settings, n: 1, response_format: "b64_json", output_format: "png", stream: true };
  state.controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  const preview = $("preview");
  preview.dataset.updates = "0";
  $("status").textContent = "Waiting for the server…";
  let finished = false;
  try {
    const response = await fetch("v1/images/generations", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal: state.controller.signal,
    });
    if (!response.ok) throw await errorFrom(response);
    const type = response.headers.get("Content-Type") || "";
    if (!type.startsWith("text/event-stream")) {
      // A server that answers in one piece (no streaming) still fills the gallery.
      const result = await response.json();
      for (const item of result.data || []) addResult(item.b64_json, "png", settings, started);
      finished = true;
      return;
    }
    for await (const sse of serverSentEvents(response.body)) {
      if (sse.data === "[DONE]") continue;
      const payload = JSON.parse(sse.data);
      const kind = payload.type || sse.name;
      if (payload.error || kind === "error") throw new ApiError(describeError(payload.error || payload));
      if (kind === "image_generation.partial_image") {
        const n = Number(preview.dataset.updates) + 1;
        preview.dataset.updates = String(n);
        showPreview(`data:${mimeOf(payload.output_format)};base64,${payload.b64_json}`, `Preview ${n} of "${settings.prompt}"`);
        $("status").textContent = `Preview ${n} of ${settings.partial_images}…`;
      } else if (kind === "image_generation.completed") {
        learnSize(payload.size);
        addResult(payload.b64_json, payload.output_format, settings, started);
        finished = true;
      }
    }
    if (!finished) throw new ApiError("The stream ended before the image was complete.");
  } catch (err) {
    if (err.name === "AbortError") {
      $("status").textContent = "Stopped.";
    } else {
      showError(err instanceof ApiError ? err.message : `Request failed: ${err.message}`);
      $("status").textContent = "No image.";
    }
  } finally {
    setBusy(false);
    state.controller = null;
    if (finished && $("next-seed").checked) $("seed").value = String(settings.seed + 1);
  }
}

// ---- results ----------------------------------------------------------------------------

function slug(text) {
  return text.toLowerCase().replace(/[^a-z0-9]+/g, "-").replace(/^-|-$/g, "").slice(0, 40) || "image";
}

function addResult(b64, format, settings, started) {
  const seconds = ((performance.now() - started) / 1000).toFixed(1);
  const mime = mimeOf(format);
  const url = URL.createObjectURL(blobFrom(b64, mime));
  showPreview(url, `Generated image of "${settings.prompt}"`);

  const item = document.createElement("li");
  item.className = "result";
  const img = document.createElement("img");
  img.src = url;
  img.alt = `Generated image of "${settings.prompt}"`;
  const details = document.createElement("dl");
  const rows = [
    ["Prompt", settings.prompt],
    ["Negative", settings.negative_prompt],
    ["Model", settings.model],
    ["Seed", settings.seed],
    ["Steps", settings.num_inference_steps ?? "default"],
    ["Guidance", settings.guidance_scale ?? "default"],
    ["Time", `${seconds} s`],
  ];
  for (const [label, value] of rows) {
    if (value === undefined || value === "") continue;
    const dt = document.createElement("dt");
    dt.textContent = label;
    const dd = document.createElement("dd");
    dd.textContent = String(value);
    details.append(dt, dd);
  }
  const link = document.createElement("a");
  link.href = url;
  link.download = `musefast-${settings.seed}-${slug(settings.prompt)}.${format === "jpeg" ? "jpg" : format || "png"}`;
  link.textContent = "Download";
  item.append(img, details, link);
  img.addEventListener("load", () => {
    // The size shown is the image's own, which is what the model made.
    const size = `${img.naturalWidth}×${img.naturalHeight}`;
    const dt = document.createElement("dt");
    dt.textContent = "Size";
    const dd = document.createElement("dd");
    dd.textContent = size;
    details.append(dt, dd);
    $("status").textContent = `Done: ${size} in ${seconds} s.`;
  }, { once: true });
  $("gallery").prepend(item);
  $("gallery-empty").hidden = true;
}

// ---- wiring -----------------------------------------------------------------------------

function init() {
  const key = $("api-key");
  key.value = sessionStorage.getItem(KEY_STORAGE) || "";
  if (key.value) $("api-key-field").hidden = false;
  key.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORAGE, key.value.trim());
    loadModels();
  });
  $("model").addEventListener("change", fillSizes);
  $("generate-form").addEventListener("submit", generate);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("generate-form").requestSubmit();
  });
  loadModels();
}

init();
