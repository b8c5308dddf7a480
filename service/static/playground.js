// The playground: parses "Speaker: text" lines, asks the service to label them, shows the labels.
// Same-origin requests only; no framework and no build step.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const form = $("form");
  const textarea = $("dialogue");
  const select = $("label-set");
  const button = $("label");
  const statusLine = $("status");
  const dialogueError = $("dialogue-error");
  const labelSetError = $("label-set-error");
  const keyField = $("key-field");
  const keyInput = $("api-key");
  const keyError = $("api-key-error");
  const results = $("results");
  const meta = $("meta");
  const list = $("turns");

  // The key lives in this tab's sessionStorage only: never in the address, never in localStorage.
  const KEY_STORE = "erc-api-key";
  // Colours per label name (lower case), shared across label sets where the emotion is the same.
  // The label's name is always written next to its colour.
  const COLOURS = {
    neutral: "#8c959f", surprise: "#f08c00", fear: "#7048e8", scared: "#7048e8",
    sad: "#1c7ed6", joyful: "#f5c400", happy: "#f5c400", excited: "#e64980",
    disgust: "#2f9e44", angry: "#e03131", mad: "#e03131", frustrated: "#d9480f",
    peaceful: "#12b886", powerful: "#5c7cfa",
  };

  class Cancelled extends Error {}
  class Handled extends Error {}

  const state = {
    ready: false,
    pending: false, // Label was pressed before the service was ready
    generation: 0, // bumped by every Label press: older retries and detail requests stop
    current: null, // {turns, lines, labelSet}: what the shown labels were computed for
  };

  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  function setStatus(text, kind = "") {
    statusLine.textContent = text;
    statusLine.dataset.kind = kind;
  }

  function colour(label) {
    const known = COLOURS[label.toLowerCase()];
    if (known) return known;
    let hash = 0;
    for (const ch of label) hash = (hash * 31 + ch.codePointAt(0)) >>> 0;
    return `hsl(${hash % 360} 65% 45%)`;
  }

  function el(tag, attrs = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs)) {
      if (name === "class") node.className = value;
      else if (name === "text") node.textContent = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) node.append(child);
    return node;
  }

  const percent = (p) => `${(100 * p).toFixed(1)}%`;

  // "Speaker: text" per non-empty line. lines[i] is turn i's line number (1-based), so that an
  // error the API reports for turns[i] is shown against the line the person wrote.
  function parse(source) {
    const turns = [];
    const lines = [];
    const noColon = [];
    source.split(/\r?\n/).forEach((raw, index) => {
      if (!raw.trim()) return;
      const colon = raw.indexOf(":");
      if (colon < 0) {
        // Sent as it is: the API's own message names the missing speaker.
        noColon.push(turns.length);
        turns.push({ speaker: "", text: raw.trim() });
      } else {
        turns.push({ speaker: raw.slice(0, colon).trim(), text: raw.slice(colon + 1).trim() });
      }
      lines.push(index + 1);
    });
    return { turns, lines, noColon };
  }

  function retryAfter(response, fallback) {
    const value = Number.parseFloat(response.headers.get("Retry-After"));
    return Number.isFinite(value) && value >= 0 ? Math.max(1, Math.ceil(value)) : fallback;
  }

  async function countdown(seconds, what, kind, generation) {
    for (let left = seconds; left > 0; left -= 1) {
      if (generation !== undefined && generation !== state.generation) throw new Cancelled();
      setStatus(`${what}, retrying in ${left} s`, kind);
      await sleep(1000);
    }
    if (generation !== undefined && generation !== state.generation) throw new Cancelled();
  }

  async function firstMessage(response) {
    try {
      const body = await response.json();
      return Array.isArray(body.detail) && body.detail.length ? body.detail[0].msg : body.detail || "";
    } catch {
      return "";
    }
  }

  // Readiness: the label sets come from /ready; while the service loads, say so and ask again.
  async function waitReady() {
    for (;;) {
      let response;
      let body = {};
      try {
        response = await fetch("/ready", { cache: "no-store" });
        body = await response.json();
      } catch {
        await countdown(5, "The service cannot be reached", "error");
        continue;
      }
      if (response.ok) return body.label_sets || [];
      const why = {
        loading: "The service is loading its model",
        draining: "The service is shutting down",
        failed: "The service failed to load its model (the service log says why)",
        dead: "The service's engine has died; it must be restarted",
      }[body.status] || "The service is not ready";
      await countdown(retryAfter(response, 2), why, body.status === "loading" ? "loading" : "error");
    }
  }

  function fillLabelSets(served, wanted) {
    select.replaceChildren(...served.map((name, i) => el("option", { value: name, text: i ? name : `${name} (default)` })));
    if (wanted && !served.includes(wanted)) {
      // Kept so that the service's own answer says why it is not served.
      select.append(el("option", { value: wanted, text: `${wanted} (not served)` }));
    }
    if (wanted) select.value = wanted;
  }

  // POST with the key (if any); 429 and 503 wait for Retry-After and try again.
  async function post(path, body, generation) {
    for (;;) {
      const headers = { "Content-Type": "application/json" };
      const key = sessionStorage.getItem(KEY_STORE);
      if (key) headers.Authorization = `Bearer ${key}`;
      let response;
      try {
        response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
      } catch {
        await countdown(5, "The service cannot be reached", "error", generation);
        continue;
      }
      if (generation !== state.generation) throw new Cancelled();
      if (response.status === 429 || response.status === 503) {
        const message = await firstMessage(response);
        const seconds = retryAfter(response, response.status === 429 ? 1 : 5);
        await countdown(seconds, `The service is busy${message ? ` (${message})` : ""}`, "busy", generation);
        continue;
      }
      if (response.status === 401) {
        askForKey(await firstMessage(response));
        throw new Handled();
      }
      let data = null;
      try {
        data = await response.json();
      } catch {
        data = null;
      }
      return { status: response.status, data };
    }
  }

  function askForKey(message) {
    keyField.hidden = false;
    keyInput.setAttribute("aria-invalid", "true");
    keyError.textContent = message || "This service needs an API key.";
    setStatus("This service needs an API key: enter it and press Label again.", "error");
    keyInput.focus();
  }

  function clearErrors() {
    for (const node of [dialogueError, labelSetError, keyError]) node.replaceChildren();
    for (const node of [textarea, select, keyInput]) node.removeAttribute("aria-invalid");
  }

  function errorList(target, messages) {
    if (!messages.length) return;
    target.replaceChildren(el("ul", {}, ...messages.map((m) => el("li", { text: m }))));
  }

  // A 422's detail[].loc names the field: a turn (shown as its line), or the label set.
  function showErrors(detail, parsed) {
    const forDialogue = [];
    const forLabelSet = [];
    const forKey = [];
    for (const error of Array.isArray(detail) ? detail : [{ loc: [], msg: String(detail) }]) {
      const loc = Array.isArray(error.loc) ? error.loc : [];
      const at = loc.indexOf("turns");
      if (loc.includes("label_set")) {
        forLabelSet.push(error.msg);
      } else if (loc[0] === "header" && loc[1] === "authorization") {
        forKey.push(error.msg);
      } else if (at >= 0 && Number.isInteger(loc[at + 1]) && loc[at + 1] < parsed.lines.length) {
        const turn = loc[at + 1];
        const field = typeof loc[at + 2] === "string" ? ` (${loc[at + 2]})` : "";
        const hint = parsed.noColon.includes(turn) ? "; write the line as Speaker: text" : "";
        forDialogue.push(`Line ${parsed.lines[turn]}${field}: ${error.msg}${hint}`);
      } else {
        forDialogue.push(error.msg);
      }
    }
    errorList(dialogueError, forDialogue);
    errorList(labelSetError, forLabelSet);
    errorList(keyError, forKey);
    if (forDialogue.length) textarea.setAttribute("aria-invalid", "true");
    if (forLabelSet.length) select.setAttribute("aria-invalid", "true");
    if (forKey.length) keyInput.setAttribute("aria-invalid", "true");
    setStatus("The service could not label this input; see the messages next to the fields.", "error");
  }

  function bars(scores, top, index) {
    return el(
      "ul",
      { class: "bars", "aria-label": `Probabilities for turn ${index + 1}` },
      ...Object.entries(scores).map(([name, p]) => {
        const fill = el("span");
        fill.style.width = `${(100 * p).toFixed(2)}%`;
        fill.style.setProperty("--c", colour(name));
        const bar = el(
          "div",
          {
            class: "bar",
            role: "meter",
            "aria-label": name,
            "aria-valuemin": "0",
            "aria-valuemax": "100",
            "aria-valuenow": (100 * p).toFixed(1),
            "aria-valuetext": percent(p),
          },
          fill,
        );
        return el(
          "li",
          name === top ? { class: "top" } : {},
          el("span", { "aria-hidden": "true", text: name }),
          bar,
          el("span", { class: "num", "aria-hidden": "true", text: percent(p) }),
        );
      }),
    );
  }

  function chip(label, p) {
    const node = el(
      "span",
      { class: "chip" },
      el("span", { class: "sr-only", text: "label " }),
      label,
      el("span", { class: "pct", text: percent(p) }),
    );
    node.style.setProperty("--c", colour(label));
    return node;
  }

  function turnItem(turn, prediction, index) {
    const score = prediction.scores[prediction.label];
    const details = el("div", { class: "details", id: `details-${index}`, role: "region", "aria-label": `What the service used for turn ${index + 1}` });
    details.hidden = true;
    const head = el(
      "button",
      { type: "button", class: "turn-head", "aria-expanded": "false", "aria-controls": details.id },
      el("span", { class: "turn-text" }, el("span", { class: "speaker", text: `${turn.speaker}: ` }), turn.text),
      chip(prediction.label, score),
    );
    const item = el("li", { class: "turn" }, head, bars(prediction.scores, prediction.label, index), details);
    item.dataset.index = String(index);
    item.dataset.label = prediction.label;
    item.dataset.score = String(score);
    head.addEventListener("click", () => toggleDetails(item, head, details, index));
    return item;
  }

  async function toggleDetails(item, head, details, index) {
    const open = head.getAttribute("aria-expanded") !== "true";
    head.setAttribute("aria-expanded", String(open));
    details.hidden = !open;
    if (!open || details.dataset.loaded) return;
    const generation = state.generation;
    const { turns, labelSet } = state.current;
    details.replaceChildren(el("p", { text: "Asking the service what it used for this turn…" }));
    try {
      const { status, data } = await post(
        "/predict",
        { dialogue: { turns }, target: index, label_set: labelSet, debug: true },
        generation,
      );
      if (status !== 200) {
        const messages = Array.isArray(data?.detail) ? data.detail.map((e) => e.msg) : [`HTTP ${status}`];
        details.replaceChildren(el("p", { class: "error", text: messages.join("; ") }));
        return;
      }
      details.dataset.loaded = "true";
      renderDetails(details, data);
      setStatus(`Showing what the service used for turn ${index + 1}.`);
    } catch (error) {
      if (error instanceof Cancelled || error instanceof Handled) {
        details.replaceChildren();
        head.setAttribute("aria-expanded", "false");
        details.hidden = true;
        return;
      }
      throw error;
    }
  }

  function renderDetails(details, data) {
    const demos = data.demonstrations || [];
    details.replaceChildren(
      el("h3", { text: `Demonstrations retrieved (${demos.length})` }),
      demos.length
        ? el(
            "ol",
            { class: "demos" },
            ...demos.map((d) =>
              el(
                "li",
                { class: "demo", "data-label": d.label },
                `“${d.text}” `,
                labelTag(d.label),
                ` similarity ${d.score.toFixed(3)}, from dialogue ${d.dialogue_id}`,
              ),
            ),
          )
        : el("p", { text: "None: this model's prompts carry no demonstrations." }),
      el("h3", { text: "Prompt" }),
      el("pre", { class: "prompt", tabindex: "0", "aria-label": "The rendered prompt" }, data.prompt || ""),
      el("p", {
        class: "help",
        text: `Labelled alone (/predict): ${data.label}, ${percent(data.scores[data.label])}.`,
      }),
    );
  }

  function labelTag(label) {
    const node = el("span", { class: "chip" }, el("span", { class: "sr-only", text: "label " }), label);
    node.style.setProperty("--c", colour(label));
    return node;
  }

  function updateAddress(labelSet, source) {
    const params = new URLSearchParams({ label_set: labelSet, d: source });
    history.replaceState(null, "", `${location.pathname}?${params}`);
  }

  async function label() {
    if (!state.ready) {
      state.pending = true;
      setStatus("The service is not ready yet; the dialogue will be labelled once it is.", "loading");
      return;
    }
    const generation = ++state.generation;
    if (keyInput.value) sessionStorage.setItem(KEY_STORE, keyInput.value);
    clearErrors();
    const source = textarea.value;
    const parsed = parse(source);
    const labelSet = select.value;
    updateAddress(labelSet, source);
    setStatus("Labelling…", "busy");
    results.setAttribute("aria-busy", "true");
    const started = performance.now();
    try {
      const { status, data } = await post(
        "/predict_dialogue",
        { dialogues: [{ turns: parsed.turns }], label_set: labelSet },
        generation,
      );
      const ms = Math.round(performance.now() - started);
      if (status === 422) {
        showErrors(data?.detail, parsed);
        return;
      }
      if (status !== 200) {
        const message = Array.isArray(data?.detail) ? data.detail.map((e) => e.msg).join("; ") : `HTTP ${status}`;
        setStatus(`The service answered ${status}: ${message}`, "error");
        return;
      }
      keyField.hidden = !sessionStorage.getItem(KEY_STORE);
      state.current = { turns: parsed.turns, lines: parsed.lines, labelSet: data.label_set };
      const predictions = data.results[0].predictions;
      list.replaceChildren(...predictions.map((p, i) => turnItem(parsed.turns[i], p, i)));
      meta.textContent = `Model ${data.model}, label set ${data.label_set}: ${predictions.length} turns labelled in ${ms} ms.`;
      results.hidden = false;
      setStatus(`Labelled ${predictions.length} turns in ${ms} ms.`, "done");
    } catch (error) {
      if (!(error instanceof Cancelled || error instanceof Handled)) {
        setStatus(`Labelling failed: ${error.message}`, "error");
      }
    } finally {
      if (generation === state.generation) results.removeAttribute("aria-busy");
    }
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    label();
  });
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
      event.preventDefault();
      form.requestSubmit();
    }
  });

  async function start() {
    const params = new URLSearchParams(location.search);
    const wanted = params.get("label_set");
    if (params.has("d")) textarea.value = params.get("d");
    const key = sessionStorage.getItem(KEY_STORE);
    if (key) {
      keyInput.value = key;
      keyField.hidden = false;
    }
    const served = await waitReady();
    fillLabelSets(served, wanted);
    state.ready = true;
    button.disabled = false;
    setStatus(`Ready: label sets ${served.join(", ")}.`, "done");
    if (state.pending || (params.has("d") && textarea.value.trim())) {
      state.pending = false;
      await label();
    }
  }

  start();
})();
