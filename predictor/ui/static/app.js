// The playground: pick images, stream each description from the OpenAI chat-completions route,
// download the results. It talks to the server only through `v1/chat/completions` (streamed)
// and `v1/models`, relative to this page, so it also works behind a path prefix.
"use strict";

(() => {
  const config = JSON.parse(document.getElementById("server-config").textContent);
  const CHAT_URL = "v1/chat/completions";
  const MODELS_URL = "v1/models";
  const MODELS_POLL_MS = 10000;
  // What `qwen-vl-describe` sends from a folder by default; hidden files and folders skipped.
  const IMAGE_EXTENSIONS = [".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"];
  const BUSY_RETRIES = 5; // 503 (queue full): wait Retry-After and try again, as describe does
  const PRESETS = [
    ["server", "Server default", config.default_prompt],
    ["caption", "Short caption", "Write a short caption for this image, in one sentence."],
    ["detailed", "Detailed description", "Describe this image in detail."],
    ["alt", "Alt text", "Write alt text for this image: one concise sentence for a person who cannot see it."],
    ["tags", "Tags (comma-separated)", "List tags for this image as one comma-separated list of lowercase keywords, nothing else."],
    ["custom", "Custom", ""],
  ];
  // The JSON schema the page starts with: one caption object per image.
  const DEFAULT_SCHEMA = {
    type: "object",
    properties: {
      caption: { type: "string", maxLength: 120 },
      objects: { type: "array", items: { type: "string", maxLength: 30 }, maxItems: 5 },
      people: { type: "integer", minimum: 0, maximum: 100 },
      outdoor: { type: "boolean" },
    },
    required: ["caption", "objects", "people", "outdoor"],
  };

  const $ = (id) => document.getElementById(id);
  const els = {
    fileInput: $("file-input"),
    folderInput: $("folder-input"),
    dropZone: $("drop-zone"),
    selection: $("selection"),
    clear: $("clear"),
    form: $("settings"),
    preset: $("preset"),
    prompt: $("prompt"),
    maxTokens: $("max-tokens"),
    temperature: $("temperature"),
    topP: $("top-p"),
    topK: $("top-k"),
    seed: $("seed"),
    concurrency: $("concurrency"),
    minPixels: $("min-pixels"),
    maxPixels: $("max-pixels"),
    describe: $("describe"),
    stop: $("stop"),
    reset: $("reset"),
    runStatus: $("run-status"),
    results: $("results"),
    announcer: $("announcer"),
    jsonl: $("download-jsonl"),
    zip: $("download-zip"),
    ready: $("model-ready"),
    modelName: $("model-name"),
    structure: $("structure"),
    schema: $("schema"),
    labels: $("labels"),
    schemaField: $("schema-field"),
    labelsField: $("labels-field"),
    structuredWrap: $("structured-wrap"),
    structuredHead: document.querySelector("#structured thead tr"),
    structuredBody: document.querySelector("#structured tbody"),
  };

  /** @type {Item[]} */
  let items = [];
  let run = null; // {controllers: Set<AbortController>, stopped: boolean}

  // --- settings ---------------------------------------------------------------------------

  function setUpSettings() {
    const d = config.defaults;
    const l = config.limits;
    for (const [value, label] of PRESETS) els.preset.add(new Option(label, value));
    els.preset.addEventListener("change", () => {
      const preset = PRESETS.find(([value]) => value === els.preset.value);
      if (preset[0] !== "custom") els.prompt.value = preset[2];
      else els.prompt.focus();
    });
    els.prompt.addEventListener("input", () => {
      const preset = PRESETS.find(([, , text]) => text === els.prompt.value);
      els.preset.value = preset ? preset[0] : "custom";
    });
    els.maxTokens.min = 1;
    els.maxTokens.max = l.max_tokens;
    els.temperature.max = l.temperature;
    els.topK.max = l.top_k;
    els.minPixels.max = l.max_pixels;
    els.maxPixels.max = l.max_pixels;
    $("max-tokens-hint").textContent = `1–${l.max_tokens}; server default ${d.max_tokens}`;
    $("temperature-hint").textContent = `0–${l.temperature}; 0 is greedy (server default ${d.temperature})`;
    $("top-p-hint").textContent = `more than 0, at most 1; server default ${d.top_p}`;
    $("top-k-hint").textContent = `0 is off, at most ${l.top_k}; server default ${d.top_k}`;
    $("seed-hint").textContent = "empty: none; 0 to 2⁶³−1 for reproducible sampling";
    $("min-pixels-hint").textContent = `server default ${d.min_pixels}`;
    $("max-pixels-hint").textContent = `at most ${l.max_pixels}; server default ${d.max_pixels}`;
    els.reset.addEventListener("click", resetSettings);
    for (const input of [els.topP, els.seed, els.minPixels, els.maxPixels, els.schema, els.labels]) {
      input.addEventListener("input", checkCrossFields);
    }
    els.structure.addEventListener("change", showStructure);
    resetSettings();
  }

  /** Show the schema or labels field the chosen output needs. */
  function showStructure() {
    els.schemaField.hidden = els.structure.value !== "schema";
    els.labelsField.hidden = els.structure.value !== "labels";
    checkCrossFields();
  }

  /** The labels typed, trimmed, empty ones dropped. */
  const labelsOf = (text) => text.split(",").map((label) => label.trim()).filter(Boolean);

  function resetSettings() {
    const d = config.defaults;
    els.preset.value = "server";
    els.prompt.value = config.default_prompt;
    els.maxTokens.value = d.max_tokens;
    els.temperature.value = d.temperature;
    els.topP.value = d.top_p;
    els.topK.value = d.top_k;
    els.seed.value = "";
    els.minPixels.value = d.min_pixels;
    els.maxPixels.value = d.max_pixels;
    els.structure.value = "text";
    els.schema.value = JSON.stringify(DEFAULT_SCHEMA, null, 2);
    els.labels.value = "";
    showStructure();
  }

  /** Checks the browser's min/max cannot express (the API's own rules). */
  function checkCrossFields() {
    const topP = Number(els.topP.value);
    els.topP.setCustomValidity(els.topP.value !== "" && topP <= 0 ? "Top-p must be more than 0." : "");
    const seed = els.seed.value.trim();
    const seedOk = seed === "" || (/^[0-9]{1,19}$/.test(seed) && BigInt(seed) <= BigInt(config.limits.seed));
    els.seed.setCustomValidity(seedOk ? "" : `Seed must be a whole number from 0 to ${config.limits.seed}.`);
    const low = Number(els.minPixels.value);
    const high = Number(els.maxPixels.value);
    els.minPixels.setCustomValidity(low > high ? "Min pixels must not exceed max pixels." : "");
    let schemaError = "";
    if (els.structure.value === "schema") {
      try {
        const schema = JSON.parse(els.schema.value);
        if (schema === null || typeof schema !== "object" || Array.isArray(schema)) {
          schemaError = "The schema must be a JSON object.";
        }
      } catch (error) {
        schemaError = `The schema is not JSON: ${error.message}`;
      }
    }
    els.schema.setCustomValidity(schemaError);
    const noLabels = els.structure.value === "labels" && !labelsOf(els.labels.value).length;
    els.labels.setCustomValidity(noLabels ? "Give at least one label (indoor, outdoor)." : "");
  }

  /** The settings as request fields, or null after showing what is wrong. */
  function readSettings() {
    checkCrossFields();
    if (!els.form.checkValidity()) {
      els.form.reportValidity();
      return null;
    }
    return {
      prompt: els.prompt.value.trim() || config.default_prompt,
      max_tokens: Number(els.maxTokens.value),
      temperature: Number(els.temperature.value),
      top_p: Number(els.topP.value),
      top_k: Number(els.topK.value),
      seed: els.seed.value.trim(), // digits, spliced into the JSON: a Number would round it
      min_pixels: Number(els.minPixels.value),
      max_pixels: Number(els.maxPixels.value),
      concurrency: Number(els.concurrency.value),
      structure: {
        kind: els.structure.value,
        schema: els.structure.value === "schema" ? JSON.parse(els.schema.value) : null,
        labels: els.structure.value === "labels" ? labelsOf(els.labels.value) : [],
      },
    };
  }

  function requestBody(settings, dataUrl) {
    const body = {
      model: config.model,
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: settings.max_tokens,
      temperature: settings.temperature,
      top_p: settings.top_p,
      top_k: settings.top_k,
      mm_processor_kwargs: { min_pixels: settings.min_pixels, max_pixels: settings.max_pixels },
      ...structureFields(settings.structure),
      messages: [
        {
          role: "user",
          content: [
            { type: "image_url", image_url: { url: dataUrl } },
            { type: "text", text: settings.prompt },
          ],
        },
      ],
    };
    const json = JSON.stringify(body);
    return settings.seed === "" ? json : `${json.slice(0, -1)},"seed":${settings.seed}}`;
  }

  /** The request fields of guided decoding: OpenAI's for a schema, vLLM's for labels. */
  function structureFields(structure) {
    if (structure.kind === "schema") {
      return {
        response_format: {
          type: "json_schema",
          json_schema: { name: "caption", schema: structure.schema, strict: true },
        },
      };
    }
    if (structure.kind === "labels") return { structured_outputs: { choice: structure.labels } };
    return {};
  }

  // --- structured results -------------------------------------------------------------------

  let table = null; // {columns, kind} for the run being shown, or null (free text)

  function startTable(structure) {
    table = null;
    els.structuredHead.replaceChildren();
    els.structuredBody.replaceChildren();
    els.structuredWrap.hidden = structure.kind === "text";
    if (structure.kind === "text") return;
    const properties = structure.schema?.properties;
    const columns =
      structure.kind === "labels"
        ? ["label"]
        : properties && typeof properties === "object" && Object.keys(properties).length
          ? Object.keys(properties)
          : ["value"];
    table = { columns, kind: structure.kind };
    for (const name of ["image", ...columns, "finish"]) {
      const th = document.createElement("th");
      th.scope = "col";
      th.textContent = name;
      els.structuredHead.append(th);
    }
  }

  const cellText = (value) =>
    value === undefined ? "" : typeof value === "string" ? value : JSON.stringify(value);

  /** One row per described image: its parsed object's properties (or its label). */
  function renderTable() {
    if (table === null) return;
    const rows = [];
    for (const item of items) {
      if (item.state !== "done") continue;
      const tr = document.createElement("tr");
      tr.dataset.image = item.key;
      const cells = [item.key];
      let cut = false;
      if (table.kind === "labels") {
        cells.push(item.text);
      } else if (item.data === undefined) {
        cut = true; // cut at the token limit: the JSON does not parse
        cells.push(...table.columns.map(() => ""));
      } else if (table.columns.length === 1 && table.columns[0] === "value") {
        cells.push(cellText(item.data));
      } else {
        const data = item.data !== null && typeof item.data === "object" ? item.data : {};
        cells.push(...table.columns.map((name) => cellText(data[name])));
      }
      cells.push(item.finishReason || "");
      cells.forEach((text, index) => {
        const td = document.createElement(index === 0 ? "th" : "td");
        if (index === 0) td.scope = "row";
        td.textContent = text;
        if (cut && index > 0 && index <= table.columns.length) td.className = "cut";
        tr.append(td);
      });
      rows.push(tr);
    }
    els.structuredBody.replaceChildren(...rows);
  }

  // --- images -----------------------------------------------------------------------------

  class Item {
    constructor(file, key) {
      this.file = file;
      this.key = key;
      this.thumbUrl = URL.createObjectURL(file);
      this.reset();
      this.el = this.render();
    }

    reset() {
      this.state = "queued";
      this.text = "";
      this.finishReason = null;
      this.tokens = null;
      this.seconds = null;
      this.error = null;
      this.errorParam = null;
      this.data = undefined; // the parsed JSON of a schema's answer, when it parses
    }

    render() {
      const li = document.createElement("li");
      li.className = "result";
      li.dataset.testid = "result";
      li.dataset.image = this.key;
      const img = document.createElement("img");
      img.className = "thumb";
      img.alt = "";
      img.loading = "lazy";
      img.decoding = "async";
      img.src = this.thumbUrl;
      img.addEventListener("error", () => img.classList.add("broken"));
      const body = document.createElement("div");
      body.className = "result-body";
      const name = document.createElement("h3");
      name.className = "name";
      name.textContent = this.key;
      this.stateEl = document.createElement("span");
      this.stateEl.className = "state";
      name.append(" ", this.stateEl);
      this.textEl = document.createElement("p");
      this.textEl.className = "text";
      this.textEl.dataset.testid = "result-text";
      this.metaEl = document.createElement("p");
      this.metaEl.className = "meta";
      body.append(name, this.textEl, this.metaEl);
      li.append(img, body);
      this.li = li;
      this.show();
      return li;
    }

    show() {
      this.li.dataset.state = this.state;
      this.li.setAttribute("aria-busy", String(this.state === "running"));
      this.stateEl.textContent = this.state;
      if (this.error !== null) {
        this.textEl.textContent = this.error;
        this.textEl.setAttribute("role", "alert");
      } else {
        this.textEl.textContent = this.text;
        this.textEl.removeAttribute("role");
      }
      const meta = [];
      if (this.tokens !== null) meta.push(`${this.tokens} tokens`);
      if (this.finishReason) meta.push(`finish: ${this.finishReason}`);
      if (this.seconds !== null) meta.push(`${this.seconds.toFixed(2)} s`);
      this.metaEl.textContent = meta.join(" · ");
    }

    /** The record `qwen-vl-describe` writes to its JSONL manifest for this image. */
    record() {
      if (this.state === "done") {
        const record = {
          image: this.key,
          text: this.text,
          finish_reason: this.finishReason || "",
          generated_tokens: this.tokens ?? 0,
        };
        if (this.data !== undefined) record.json = this.data; // as describe --json-schema
        return record;
      }
      if (this.state === "error") {
        // As describe reports an image problem on the OpenAI route: `image[0]: ...`.
        const prefix = this.errorParam ? `${this.errorParam}: ` : null;
        const message =
          prefix && this.errorParam.includes("image_url") && this.error.startsWith(prefix)
            ? `image[0]: ${this.error.slice(prefix.length)}`
            : this.error;
        return { image: this.key, error: message };
      }
      return null;
    }
  }

  function isImagePath(path) {
    const lower = path.toLowerCase();
    const hidden = path.split("/").some((part) => part.startsWith("."));
    return !hidden && IMAGE_EXTENSIONS.some((ext) => lower.endsWith(ext));
  }

  /** Add files: [{file, key, fromFolder}]. Loose files go as they are (the server judges). */
  function addFiles(picked) {
    const taken = new Set(items.map((item) => item.key));
    let added = 0;
    for (const { file, key, fromFolder } of picked) {
      if (fromFolder && !isImagePath(key)) continue;
      let unique = key;
      for (let n = 2; taken.has(unique); n++) unique = key.replace(/(\.[^./]*)?$/, ` (${n})$1`);
      taken.add(unique);
      const item = new Item(file, unique);
      items.push(item);
      els.results.append(item.el);
      added++;
    }
    updateSelection(added === 0 && picked.length > 0 ? "No images among the files given." : "");
  }

  /** A folder's key for a file: its path below the folder picked, as describe names it. */
  function folderKey(path) {
    const slash = path.indexOf("/");
    return slash >= 0 ? path.slice(slash + 1) : path;
  }

  function updateSelection(note) {
    const bytes = items.reduce((sum, item) => sum + item.file.size, 0);
    const count = items.length;
    els.selection.textContent = count
      ? `${count} image${count === 1 ? "" : "s"}, ${formatBytes(bytes)}.${note ? " " + note : ""}`
      : note || "No images chosen.";
    els.clear.disabled = count === 0 || run !== null;
    updateDownloads();
  }

  function clearItems() {
    for (const item of items) URL.revokeObjectURL(item.thumbUrl);
    items = [];
    els.results.replaceChildren();
    updateSelection("");
  }

  async function filesFromDrop(dataTransfer) {
    // Entries must be taken before the first await: the DataTransfer empties after the event.
    const entries = [...dataTransfer.items]
      .filter((entry) => entry.kind === "file")
      .map((entry) => (entry.webkitGetAsEntry ? entry.webkitGetAsEntry() : null));
    if (!entries.length || entries.some((entry) => entry === null)) {
      return [...dataTransfer.files].map((file) => ({ file, key: file.name, fromFolder: false }));
    }
    const picked = [];
    for (const entry of entries) {
      if (entry.isFile) picked.push({ file: await fileOf(entry), key: entry.name, fromFolder: false });
      else await walkFolder(entry, "", picked);
    }
    return picked;
  }

  async function walkFolder(folder, prefix, picked) {
    const reader = folder.createReader();
    for (;;) {
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) return;
      for (const entry of batch) {
        if (entry.name.startsWith(".")) continue;
        const key = prefix + entry.name;
        if (entry.isFile) picked.push({ file: await fileOf(entry), key, fromFolder: true });
        else await walkFolder(entry, `${key}/`, picked);
      }
    }
  }

  const fileOf = (entry) => new Promise((resolve, reject) => entry.file(resolve, reject));

  function setUpPicking() {
    $("pick-files").addEventListener("click", () => els.fileInput.click());
    $("pick-folder").addEventListener("click", () => els.folderInput.click());
    els.clear.addEventListener("click", clearItems);
    els.fileInput.addEventListener("change", () => {
      addFiles([...els.fileInput.files].map((file) => ({ file, key: file.name, fromFolder: false })));
      els.fileInput.value = "";
    });
    els.folderInput.addEventListener("change", () => {
      addFiles(
        [...els.folderInput.files].map((file) => ({
          file,
          key: folderKey(file.webkitRelativePath || file.name),
          fromFolder: true,
        })),
      );
      els.folderInput.value = "";
    });
    const zone = els.dropZone;
    for (const type of ["dragenter", "dragover"]) {
      zone.addEventListener(type, (event) => {
        event.preventDefault();
        zone.classList.add("over");
      });
    }
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", async (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      if (run === null) addFiles(await filesFromDrop(event.dataTransfer));
    });
  }

  // --- describing -------------------------------------------------------------------------

  class ServerError extends Error {
    constructor(message, param = null) {
      super(message);
      this.param = param;
    }
  }

  /** The server's message from an error answer (OpenAI's shape), else its status line. */
  async function errorOf(response) {
    const text = await response.text();
    try {
      const error = JSON.parse(text).error;
      if (error && typeof error.message === "string") return new ServerError(error.message, error.param);
      if (typeof error === "string") return new ServerError(error);
    } catch {
      // not JSON: fall through
    }
    return new ServerError(`HTTP ${response.status} ${response.statusText}: ${text.slice(0, 200)}`.trim());
  }

  function dataUrlOf(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => {
        const base64 = String(reader.result).split(",", 2)[1] ?? "";
        // The server sniffs the bytes; the type only has to be an image one.
        const type = /^image\/[a-z0-9.+-]+$/i.test(file.type) ? file.type : "image/jpeg";
        resolve(`data:${type};base64,${base64}`);
      };
      reader.onerror = () => reject(new ServerError(`could not read the file: ${reader.error}`));
      reader.readAsDataURL(file);
    });
  }

  const sleep = (ms, signal) =>
    new Promise((resolve, reject) => {
      const timer = setTimeout(resolve, ms);
      signal.addEventListener("abort", () => {
        clearTimeout(timer);
        reject(signal.reason);
      });
    });

  async function post(body, signal, item) {
    for (let attempt = 0; ; attempt++) {
      const response = await fetch(CHAT_URL, {
        method: "POST",
        headers: { "content-type": "application/json", accept: "text/event-stream" },
        body,
        signal,
      });
      if (response.status !== 503 || attempt >= BUSY_RETRIES) return response;
      const wait = Number(response.headers.get("retry-after")) || 1;
      await response.body?.cancel();
      item.metaEl.textContent = `server busy, retrying in ${wait} s`;
      await sleep(wait * 1000, signal);
    }
  }

  /** Read the Server-Sent Events of one completion into `item`. */
  async function readStream(response, item) {
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let finished = false;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value.replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event
          .split("\n")
          .filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart())
          .join("\n");
        if (!data) continue;
        if (data === "[DONE]") {
          finished = true;
          continue;
        }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ServerError(chunk.error.message, chunk.error.param);
        const choice = chunk.choices?.[0];
        if (choice?.delta?.content) {
          item.text += choice.delta.content;
          item.textEl.textContent = item.text;
        }
        if (choice?.finish_reason) item.finishReason = choice.finish_reason;
        if (chunk.usage) item.tokens = chunk.usage.completion_tokens;
      }
    }
    if (!finished) throw new ServerError("the server closed the stream before the end");
  }

  async function describeOne(item, settings) {
    const controller = new AbortController();
    run.controllers.add(controller);
    item.reset();
    item.state = "running";
    item.show();
    const started = performance.now();
    try {
      if (item.file.size > config.limits.max_image_bytes) {
        throw new ServerError(
          `is ${item.file.size} bytes, more than the server's limit of ${config.limits.max_image_bytes} bytes (not sent)`,
        );
      }
      const body = requestBody(settings, await dataUrlOf(item.file));
      const response = await post(body, controller.signal, item);
      if (!response.ok) throw await errorOf(response);
      await readStream(response, item);
      if (settings.structure.kind === "schema") {
        try {
          item.data = JSON.parse(item.text);
        } catch {
          item.data = undefined; // cut at the token limit
        }
      }
      item.state = "done";
      announce(`${item.key}: done, ${item.tokens ?? "?"} tokens.`);
    } catch (error) {
      if (controller.signal.aborted) {
        item.state = "stopped";
      } else {
        item.state = "error";
        item.error = error instanceof ServerError ? error.message : `request failed: ${error.message || error}`;
        item.errorParam = error instanceof ServerError ? error.param : null;
        announce(`${item.key}: error, ${item.error}`);
      }
    } finally {
      item.seconds = (performance.now() - started) / 1000;
      run.controllers.delete(controller);
      item.show();
      renderTable();
      updateProgress();
    }
  }

  async function describeAll() {
    const settings = readSettings();
    if (settings === null || run !== null) return;
    if (!items.length) {
      els.runStatus.textContent = "Choose some images first.";
      return;
    }
    run = { controllers: new Set(), stopped: false, started: performance.now() };
    for (const item of items) {
      item.reset();
      item.show();
    }
    setRunning(true);
    startTable(settings.structure);
    updateProgress();
    let next = 0;
    const worker = async () => {
      while (!run.stopped && next < items.length) await describeOne(items[next++], settings);
    };
    await Promise.all(Array.from({ length: Math.min(settings.concurrency, items.length) }, worker));
    for (const item of items) {
      if (item.state === "queued") {
        item.state = "stopped";
        item.show();
      }
    }
    const summary = progressText();
    const stopped = run.stopped;
    run = null;
    setRunning(false);
    els.runStatus.textContent = `${stopped ? "Stopped" : "Finished"}: ${summary}.`;
  }

  function stopAll() {
    if (run === null) return;
    run.stopped = true;
    for (const controller of run.controllers) controller.abort();
    els.runStatus.textContent = "Stopping…";
  }

  function setRunning(running) {
    const hadFocus = document.activeElement === els.stop;
    els.describe.disabled = running;
    els.stop.disabled = !running;
    els.clear.disabled = running || items.length === 0;
    if (!running && hadFocus) els.describe.focus();
    if (running) els.stop.focus();
    updateDownloads();
  }

  function progressText() {
    const count = (state) => items.filter((item) => item.state === state).length;
    const seconds = run ? ((performance.now() - run.started) / 1000).toFixed(1) : null;
    const parts = [`${count("done")} done`, `${count("error")} failed`];
    if (count("running")) parts.push(`${count("running")} running`);
    if (count("queued")) parts.push(`${count("queued")} waiting`);
    if (count("stopped")) parts.push(`${count("stopped")} stopped`);
    return `${parts.join(", ")} of ${items.length}${seconds ? ` in ${seconds} s` : ""}`;
  }

  function updateProgress() {
    if (run !== null) els.runStatus.textContent = `Describing: ${progressText()}.`;
    updateDownloads();
  }

  function announce(message) {
    const line = document.createElement("p");
    line.textContent = message;
    els.announcer.append(line);
    while (els.announcer.childElementCount > 20) els.announcer.firstElementChild.remove();
  }

  // --- downloads --------------------------------------------------------------------------

  /** JSON as Python's `json.dumps(value, ensure_ascii=False)` writes it (describe's lines). */
  function pythonJson(value) {
    if (Array.isArray(value)) return `[${value.map(pythonJson).join(", ")}]`;
    if (value !== null && typeof value === "object") {
      const fields = Object.entries(value).map(([k, v]) => `${JSON.stringify(k)}: ${pythonJson(v)}`);
      return `{${fields.join(", ")}}`;
    }
    return JSON.stringify(value);
  }

  function updateDownloads() {
    const finished = items.some((item) => item.state === "done" || item.state === "error");
    els.jsonl.disabled = !finished;
    els.zip.disabled = !items.some((item) => item.state === "done");
  }

  function save(blob, name) {
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = name;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  }

  function downloadJsonl() {
    const lines = items.map((item) => item.record()).filter(Boolean).map((r) => `${pythonJson(r)}\n`);
    save(new Blob(lines, { type: "application/x-ndjson" }), "captions.jsonl");
  }

  /** `photo.jpg` -> `photo.txt`, as describe names sidecars; `a.jpg` and `a.png` would share
   * `a.txt`, so those keep their whole name (`a.jpg.txt`) rather than one replacing the other. */
  function captionNames(described) {
    const plain = described.map((item) => item.key.replace(/(\.[^./]*)?$/, ".txt"));
    const counts = new Map();
    for (const name of plain) counts.set(name, (counts.get(name) || 0) + 1);
    return plain.map((name, i) => (counts.get(name) > 1 ? `${described[i].key}.txt` : name));
  }

  function downloadZip() {
    const encoder = new TextEncoder();
    const described = items.filter((item) => item.state === "done");
    const names = captionNames(described);
    const entries = described.map((item, i) => ({ name: names[i], data: encoder.encode(item.text) }));
    save(window.StoredZip.buildZip(entries), "captions.zip");
  }

  // --- the model --------------------------------------------------------------------------

  async function checkModel() {
    try {
      const response = await fetch(MODELS_URL, { headers: { accept: "application/json" } });
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      const ids = (await response.json()).data.map((card) => card.id);
      const served = ids.includes(config.model);
      els.modelName.textContent = ids.length > 1 ? `${ids[0]} (also ${ids.slice(1).join(", ")})` : ids[0] || config.model;
      setReady(served ? "ready" : "missing", served ? "ready" : "not served");
    } catch (error) {
      setReady("unreachable", `unreachable (${error.message})`);
    }
  }

  function setReady(state, text) {
    els.ready.dataset.ready = state;
    els.ready.textContent = text;
  }

  function formatBytes(bytes) {
    if (bytes < 1024) return `${bytes} B`;
    if (bytes < 1024 * 1024) return `${(bytes / 1024).toFixed(1)} KiB`;
    return `${(bytes / 1024 / 1024).toFixed(1)} MiB`;
  }

  setUpSettings();
  setUpPicking();
  els.form.addEventListener("submit", (event) => {
    event.preventDefault();
    describeAll();
  });
  els.stop.addEventListener("click", stopAll);
  els.jsonl.addEventListener("click", downloadJsonl);
  els.zip.addEventListener("click", downloadZip);
  checkModel();
  setInterval(checkModel, MODELS_POLL_MS);
})();
