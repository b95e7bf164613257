// The search page: sends a query to /api/search, draws each result with the model's explanations.
// Text from the store (ids, keywords) is always set as text, never as HTML.
"use strict";

const form = document.getElementById("search");
const box = document.getElementById("q");
const heat = document.getElementById("heat");
const list = document.getElementById("results");
const statusLine = document.getElementById("status");
const noteLine = document.getElementById("note");
const errorLine = document.getElementById("error");
const dialog = document.getElementById("full");

let current = null;   // the last answer shown: {query, version, results}
let lastVersion = null;
let sequence = 0;     // a newer search makes an older one's answer stale
let finished = 0;     // searches finished, in body[data-searches]: what tests wait on

// Where the model looked: VAN's 7x7 region attention as a 7x7 canvas the browser scales (smoothly) over the
// picture. Each cell's opacity goes from clear (the least attended region) to the most opaque (the strongest):
// a softmax over 49 regions is rarely far from flat, and its spread is what shows where the model looked.
function drawHeat(canvas, regions) {
  const side = regions.length;
  canvas.width = side;
  canvas.height = side;
  const flat = regions.flat();
  const least = Math.min(...flat);
  const spread = Math.max(Math.max(...flat) - least, 1e-9);
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(side, side);
  flat.forEach((a, i) => {
    image.data.set([255, 40, 0, Math.round(200 * (a - least) / spread)], 4 * i);
  });
  ctx.putImageData(image, 0, 0);
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function percent(x) {
  return `${Math.round(100 * x)}%`;
}

function card(result, answer) {
  const item = element("li", "result");
  const pick = element("button", "pick");
  pick.type = "button";
  const strongest = result.keywords.length ? result.keywords[0][0] : answer.query;
  pick.title = `Search for "${strongest}" among these ${answer.results.length} results`;
  pick.setAttribute("aria-label", `${result.alt}. Search for "${strongest}" among these results`);
  const frame = element("span", "frame");
  if (result.picture) {
    const img = element("img");
    img.src = result.picture;
    img.alt = result.alt;
    img.decoding = "async";
    frame.append(img);
  } else {
    frame.append(element("span", "no-picture", result.id));
  }
  const canvas = element("canvas", "heat");
  canvas.setAttribute("aria-hidden", "true");
  drawHeat(canvas, result.regions);
  frame.append(canvas);
  pick.append(frame);
  pick.addEventListener("click", () => search(strongest, answer, result));
  item.append(pick);

  const meta = element("div", "meta");
  const title = element("p", "title");
  title.append(element("span", "rank", `#${result.rank}`), element("span", "score", `score ${result.score.toFixed(3)}`));
  meta.append(title, element("p", "id", result.id));
  const bar = element("div", "modality");
  bar.setAttribute("role", "img");
  bar.setAttribute("aria-label", `visual ${percent(result.visual)}, language ${percent(result.language)}`);
  const visual = element("span", "visual");
  visual.style.width = percent(result.visual);
  const language = element("span", "language");
  language.style.width = percent(result.language);
  bar.append(visual, language);
  meta.append(bar, element("p", "weights", `visual ${percent(result.visual)} · language ${percent(result.language)}`));
  const keywords = element("ul", "keywords");
  const most = Math.max(...result.keywords.map(([, w]) => w), 1e-9);
  for (const [word, weight] of result.keywords) {
    const chip = element("li", "", word);
    chip.append(element("small", "", ` ${percent(weight)}`));  // the weight itself: a flat LAN reads as flat
    chip.style.setProperty("--attention", (weight / most).toFixed(3));
    chip.title = `LAN attention ${percent(weight)}`;
    keywords.append(chip);
  }
  meta.append(keywords);
  if (result.picture) {
    const full = element("a", "full", "full size");
    full.href = result.picture;
    full.addEventListener("click", (event) => {
      event.preventDefault();
      const img = document.getElementById("full-img");
      img.src = result.picture;
      img.alt = result.alt;
      document.getElementById("full-caption").textContent = result.alt;
      dialog.showModal();
    });
    meta.append(full);
  }
  item.append(meta);
  return item;
}

function show(line, text) {
  line.textContent = text || "";
  line.hidden = !text;
}

function describe(answer, clicked, previous) {
  const who = answer.canary
    ? `the canary, model version ${answer.version} (${percent(answer.canary_share)} of searches)`
    : `model version ${answer.version}`;
  const where = answer.among === null ? "the whole store" : `the ${answer.among} previous results`;
  let text = `${answer.results.length} results for "${answer.query}" from ${where}, answered by ${who} ` +
             `in ${Math.round(answer.server_ms)} ms.`;
  if (clicked) text += ` (You clicked ${clicked.id}; press Enter in the search box to search everything again.)`;
  if (!answer.pictures) text += " This model version's store has no pictures: showing ids.";
  const notes = [];
  if (answer.note) notes.push(answer.note);
  if (previous !== null && answer.version !== null && answer.version !== previous) {
    notes.push(`The model changed under the page: version ${previous} answered before, version ${answer.version} now.`);
  }
  return [text, notes.join(" ")];
}

async function search(query, among, clicked) {
  const started = performance.now();
  const mine = ++sequence;
  const params = new URLSearchParams({ q: query });
  if (among) {
    params.set("rows", among.results.map((r) => r.row).join(","));
    params.set("v", `${among.version}`);
    box.value = query;
  }
  document.body.dataset.busy = "true";
  let answer;
  let response = null;
  try {
    response = await fetch(`/api/search?${params}`);
    answer = await response.json();
  } catch (e) {
    answer = response === null
      ? { error: "The page cannot reach its own server (amc-ui stopped?): reload when it is back.", kind: "app" }
      : { error: `The page's server answered HTTP ${response.status} without results` +
                 (response.status === 414 ? " (the query is far too long)." : "."), kind: "app" };
  }
  if (mine !== sequence) return;  // a newer search was started meanwhile
  list.replaceChildren();
  let images = [];
  if (answer.error) {
    show(errorLine, answer.error);
    show(noteLine, "");
    statusLine.textContent = "";
  } else {
    show(errorLine, "");
    const [text, note] = describe(answer, clicked, lastVersion);
    statusLine.textContent = text;
    show(noteLine, note);
    lastVersion = answer.version;
    current = answer;
    list.append(...answer.results.map((r) => card(r, answer)));
    // A result clicked (or Enter on it) is gone with the old list: keep the keyboard in the results.
    if (clicked && list.querySelector(".pick")) list.querySelector(".pick").focus();
    images = [...list.querySelectorAll("img")];
    // Painted means with its pictures: wait until each is decoded (or failed), then for the next frame.
    await Promise.all(images.map((img) => img.decode().catch(() => null)));
  }
  await new Promise((done) => requestAnimationFrame(() => requestAnimationFrame(done)));
  if (mine !== sequence) return;
  window.amcLast = {
    query, ms: performance.now() - started, error: answer.error || null, version: answer.version ?? null,
    results: answer.results ? answer.results.length : 0, images: images.length,
    loaded: images.filter((img) => img.complete && img.naturalWidth > 0).length,
  };
  delete document.body.dataset.busy;
  document.body.dataset.searches = `${++finished}`;
}

form.addEventListener("submit", (event) => {
  event.preventDefault();
  search(box.value, null, null);
});

heat.addEventListener("change", () => document.body.classList.toggle("show-heat", heat.checked));
document.body.classList.toggle("show-heat", heat.checked);  // a browser may restore the box's state
box.focus();
