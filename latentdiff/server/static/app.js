// The page: plain JavaScript over the same /sdapi/v1 API the A1111 clients use.
"use strict";
const $ = (id) => document.getElementById(id);
const api = (path, options) => fetch(`/sdapi/v1/${path}`, options);

async function fillChoices() {
  const [samplers, schedulers, options] = await Promise.all(
    ["samplers", "schedulers", "options"].map((p) => api(p).then((r) => r.json())));
  for (const s of samplers) $("sampler_name").add(new Option(s.name, s.name, s.name === "Euler a", s.name === "Euler a"));
  for (const s of schedulers) $("scheduler").add(new Option(s.label, s.name));
  $("model").textContent = options.sd_model_checkpoint;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

// A1111's 422 body lists {loc, msg}; others carry a detail string
function errorText(status, body) {
  if (Array.isArray(body.detail)) return body.detail.map((d) => d.msg).join("\n");
  return `${status}: ${body.detail || body.error || "request failed"}`;
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(new Error(`cannot read ${file.name}`));
    reader.readAsDataURL(file);
  });
}

async function requestBody() {
  const body = { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value,
                 sampler_name: $("sampler_name").value, scheduler: $("scheduler").value };
  for (const id of ["steps", "batch_size", "seed", "width", "height"]) {
    if ($(id).value !== "") body[id] = Number.parseInt($(id).value, 10);
  }
  body.cfg_scale = Number.parseFloat($("cfg_scale").value);
  const file = $("init_image").files[0];
  if (file) {
    body.init_images = [await readFile(file)];
    body.denoising_strength = Number.parseFloat($("denoising_strength").value);
  }
  return body;
}

function addToGallery(images, info) {
  const figures = images.map((b64, i) => {
    const figure = document.createElement("figure");
    const img = new Image();
    img.src = `data:image/png;base64,${b64}`;
    img.alt = info.infotexts[i];
    img.className = "result";
    const link = document.createElement("a");
    link.href = img.src;
    link.download = `${info.all_seeds[i]}.png`;
    link.textContent = "download";
    const caption = document.createElement("figcaption");
    caption.textContent = info.infotexts[i];
    figure.append(img, caption, link);
    return figure;
  });
  $("gallery").prepend(...figures);  // newest request first, its images in batch order
}

async function pollProgress(running) {
  while (running.active) {
    try {
      const p = await api("progress?skip_current_image=false").then((r) => r.json());
      $("progress").value = p.progress;
      if (p.current_image) {
        $("preview").src = `data:image/png;base64,${p.current_image}`;
        $("preview-box").hidden = false;
      }
    } catch (e) { /* the next poll tries again */ }
    await new Promise((r) => setTimeout(r, 400));
  }
}

async function generate(event) {
  event.preventDefault();
  showError("");
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  const running = { active: true };
  pollProgress(running);
  try {
    const body = await requestBody();
    const mode = body.init_images ? "img2img" : "txt2img";
    const response = await api(mode, { method: "POST", headers: { "Content-Type": "application/json" },
                                        body: JSON.stringify(body) });
    const result = await response.json();
    if (!response.ok) throw new Error(errorText(response.status, result));
    addToGallery(result.images, JSON.parse(result.info));
    $("progress").value = 1;
  } catch (e) {
    showError(e.message);
  } finally {
    running.active = false;
    $("generate").disabled = false;
    $("interrupt").disabled = true;
    $("preview-box").hidden = true;
  }
}

$("form").addEventListener("submit", generate);
$("interrupt").addEventListener("click", () => api("interrupt", { method: "POST" }));
fillChoices().catch((e) => showError(`cannot reach the server: ${e.message}`));
