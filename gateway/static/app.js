// lookalike web page: plain JavaScript, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  file: null,        // the photo being searched
  objects: [],       // objects of the first search (boxes in photo pixels)
  size: null,        // {width, height} of the photo after EXIF rotation
  selected: null,    // index of the selected box
  last: null,        // repeat the last query when the filters change: {kind, ...}
  seen: {categories: new Set(), shops: new Set()},
};

function setStatus(text, kind) {
  const el = $("status");
  el.textContent = text;
  el.className = "status" + (kind ? " " + kind : "");
}

function filters() {
  const f = {};
  const category = $("f-category").value.trim();
  const shop = $("f-shop").value.trim();
  if (category) f.categories = [category];
  if (shop) f.shops = [shop];
  if ($("f-min").value !== "") f.price_min = Number($("f-min").value);
  if ($("f-max").value !== "") f.price_max = Number($("f-max").value);
  if ($("f-stock").checked) f.in_stock = true;
  return f;
}

async function callApi(url, options) {
  let response;
  try {
    response = await fetch(url, options);
  } catch (e) {
    throw new Error("the gateway cannot be reached (" + e.message + ")");
  }
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) {
    const detail = body && body.detail ? body.detail : response.statusText;
    throw new Error(response.status + ": " + (typeof detail === "string" ? detail : JSON.stringify(detail)));
  }
  return body;
}

function money(value, currency) {
  try {
    return new Intl.NumberFormat(undefined, {style: "currency", currency: currency || "EUR"}).format(value);
  } catch (e) {
    return value.toFixed(2) + " " + (currency || "");
  }
}

// ------------------------------------------------------------------ photo and boxes

function showPhoto(file) {
  const img = $("preview");
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(file);
  $("stage").hidden = false;
  $("boxes").innerHTML = "";
  $("hint").hidden = true;
}

function drawBoxes() {
  const layer = $("boxes");
  layer.innerHTML = "";
  if (!state.size) return;
  const {width, height} = state.size;
  // Larger boxes first so smaller ones sit on top and stay clickable.
  const order = state.objects.map((o, i) => i).filter((i) => state.objects[i].box);
  const area = (b) => (b.x2 - b.x1) * (b.y2 - b.y1);
  order.sort((a, b) => area(state.objects[b].box) - area(state.objects[a].box));
  for (const i of order) {
    const obj = state.objects[i];
    const b = obj.box;
    const el = document.createElement("button");
    el.type = "button";
    el.className = "box" + (i === state.selected ? " selected" : "") + (obj.label === "image" ? " whole" : "");
    el.dataset.index = i;
    el.style.left = (100 * Math.max(0, b.x1) / width) + "%";
    el.style.top = (100 * Math.max(0, b.y1) / height) + "%";
    el.style.width = (100 * (Math.min(width, b.x2) - Math.max(0, b.x1)) / width) + "%";
    el.style.height = (100 * (Math.min(height, b.y2) - Math.max(0, b.y1)) / height) + "%";
    const label = document.createElement("span");
    label.textContent = obj.label === "image" ? "whole photo" : obj.label;
    el.appendChild(label);
    el.title = "search only this " + label.textContent;
    el.addEventListener("click", (ev) => { ev.preventDefault(); searchBox(i); });
    layer.appendChild(el);
  }
  $("hint").hidden = order.length === 0;
}

// ------------------------------------------------------------------ queries

async function searchPhoto(file) {
  state.file = file;
  state.objects = [];
  state.selected = null;
  state.size = null;
  showPhoto(file);
  await runSearch(null, "your photo");
}

function searchBox(index) {
  const obj = state.objects[index];
  state.selected = index;
  drawBoxes();
  const name = obj.label === "image" ? "the whole photo" : "the " + obj.label;
  return runSearch(obj.box, name);
}

async function runSearch(box, name) {
  if (!state.file) { setStatus("Upload a photo to start.", ""); return; }
  state.last = {kind: "search", box, name};
  const form = new FormData();
  form.append("photo", state.file);
  if (box) form.append("box", [box.x1, box.y1, box.x2, box.y2].map((v) => v.toFixed(1)).join(","));
  form.append("filters", JSON.stringify(filters()));
  form.append("top_k", "8");
  setStatus("Searching…", "loading");
  try {
    const result = await callApi("/api/search", {method: "POST", body: form});
    if (!box) {
      state.size = result.image;
      state.objects = result.objects;
      state.selected = result.objects.findIndex((o) => o.label !== "image");
      if (state.selected < 0) state.selected = result.objects.length - 1;
      drawBoxes();
    }
    const obj = box ? result.objects[0] : result.objects[state.selected];
    const label = box ? name : (obj && obj.label !== "image" ? "the " + obj.label : "your photo");
    showResults(obj ? obj.products : [], "Results for " + label, result.took_ms, result.catalogue_as_of,
      obj ? obj.box : null, obj ? obj.answer : null);
  } catch (e) {
    showError("Search failed: " + e.message);
  }
}

async function recommend(product) {
  state.last = {kind: "recommend", product};
  setStatus("Finding products like " + (product.title || product.product_id) + "…", "loading");
  try {
    const result = await callApi("/api/recommend", {
      method: "POST", headers: {"Content-Type": "application/json"},
      body: JSON.stringify({positive: [product.product_id], top_k: 8, filters: filters()}),
    });
    showResults(result.objects[0] ? result.objects[0].products : [],
      "More like " + (product.title || product.product_id), result.took_ms, result.catalogue_as_of, null);
  } catch (e) {
    showError("Recommendations failed: " + e.message);
  }
}

function rerun() {
  if (!state.last) return;
  if (state.last.kind === "recommend") recommend(state.last.product);
  else runSearch(state.last.box, state.last.name);
}

// ------------------------------------------------------------------ results

function showError(text) {
  setStatus(text, "error");
  $("results").innerHTML = "";
  $("results-title").hidden = true;
  $("answer").hidden = true;
}

// A calibrated search's answer (`lookalike calibrate`; null: not calibrated): the line above the cards
// when none of them is the photographed product, and the badge on a card.
const ANSWER_LINES = {
  "similar": "No confident match \u2014 similar items:",
  "no confident match": "No confident match \u2014 nothing similar in the catalogue; the closest items:",
};
const BADGES = {same: "Same product", similar: "Similar"};

function showAnswer(answer, count) {
  const line = $("answer");
  line.textContent = ANSWER_LINES[answer] || "";
  line.className = "answer" + (answer ? " " + answer.replace(/ /g, "-") : "");
  line.hidden = !count || !ANSWER_LINES[answer];
}

function remember(product) {
  if (product.category) state.seen.categories.add(product.category);
  for (const o of product.offers) state.seen.shops.add(o.shop);
  for (const [list, values] of [["categories", state.seen.categories], ["shops", state.seen.shops]]) {
    const el = $(list);
    el.innerHTML = "";
    for (const v of [...values].sort()) {
      const option = document.createElement("option");
      option.value = v;
      el.appendChild(option);
    }
  }
}

// "catalogue as of 14:05:09": when the last catalogue change was applied (prices and stock are that fresh).
function asOf(seconds) {
  if (seconds == null) return "";
  const when = new Date(seconds * 1000);
  const sameDay = when.toDateString() === new Date().toDateString();
  return "catalogue as of " + (sameDay ? when.toLocaleTimeString() : when.toLocaleString());
}

// The matching object of a catalogue photo, drawn on its thumbnail (box in pixels of an image of imageSize).
function drawMatch(card, p) {
  const el = card.querySelector(".match-box");
  if (!p.matched_box || !p.image_size || !p.thumbnail_url) return;
  const [w, h] = p.image_size;
  const b = p.matched_box;
  el.style.left = (100 * b.x1 / w) + "%";
  el.style.top = (100 * b.y1 / h) + "%";
  el.style.width = (100 * (b.x2 - b.x1) / w) + "%";
  el.style.height = (100 * (b.y2 - b.y1) / h) + "%";
  el.title = "matched " + (p.matched_label === "image" ? "the whole photo" : p.matched_label || "object");
  el.hidden = false;
}

// The searched region of the shopper's photo, beside each result, so the two can be compared.
function drawQuery(card, queryBox) {
  const preview = $("preview");
  if (!queryBox || !preview.complete || !preview.naturalWidth || !state.size) return;
  const canvas = card.querySelector(".query-crop");
  const k = preview.naturalWidth / state.size.width;  // photo pixels -> preview pixels
  const sw = (queryBox.x2 - queryBox.x1) * k, sh = (queryBox.y2 - queryBox.y1) * k;
  const fit = Math.min(canvas.width / sw, canvas.height / sh);
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.drawImage(preview, queryBox.x1 * k, queryBox.y1 * k, sw, sh,
    (canvas.width - sw * fit) / 2, (canvas.height - sh * fit) / 2, sw * fit, sh * fit);
  card.querySelector(".query-side").hidden = false;
}

function showResults(products, title, tookMs, catalogueAsOf, queryBox, answer) {
  const box = $("results");
  box.innerHTML = "";
  showAnswer(answer, products.length);
  $("results-title").textContent = title;
  const stamp = asOf(catalogueAsOf);
  if (stamp) $("results-title").appendChild(Object.assign(document.createElement("span"),
    {className: "as-of", textContent: stamp}));
  $("results-title").hidden = false;
  if (!products.length) {
    setStatus("No matching products. Try another box, or loosen the filters.", "empty");
    return;
  }
  setStatus(products.length + " products" + (tookMs != null ? " in " + tookMs + " ms" : ""), "ok");
  const template = $("card-template");
  for (const p of products) {
    remember(p);
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.productId = p.product_id;
    const img = card.querySelector(".thumb img");
    if (p.thumbnail_url) {
      img.src = p.thumbnail_url;
      img.alt = p.title;
    } else {
      img.replaceWith(Object.assign(document.createElement("span"), {className: "noimg", textContent: "no image"}));
    }
    drawMatch(card, p);
    drawQuery(card, queryBox);
    card.dataset.match = p.match || "";
    if (BADGES[p.match]) {
      const badge = card.querySelector(".badge");
      badge.textContent = BADGES[p.match];
      badge.className = "badge " + p.match;
      badge.hidden = false;
    }
    card.querySelector(".title").textContent = p.title || p.product_id;
    card.querySelector(".meta").textContent = [p.brand, p.category].filter(Boolean).join(" · ");
    const best = p.best_offer;
    card.querySelector(".best").textContent = best ? money(best.price, best.currency) : "no offers";
    card.querySelector(".shop").textContent = best ? "at " + best.shop + (best.in_stock ? "" : " (out of stock)") : "";
    card.querySelector(".score").textContent = "similarity " + p.score.toFixed(3) +
      (p.merged_product_ids.length ? " · " + (p.merged_product_ids.length + 1) + " listings" : "");
    const rows = card.querySelector(".compare tbody");
    for (const o of p.offers) {
      const tr = document.createElement("tr");
      if (best && o.shop === best.shop && o.price === best.price) tr.className = "best-row";
      const cells = [o.shop, money(o.price, o.currency), o.in_stock ? "in stock" : "out of stock"];
      for (const [i, text] of cells.entries()) {
        const td = document.createElement("td");
        if (i === 0 && o.url && /^https?:/.test(o.url)) {
          const a = Object.assign(document.createElement("a"), {href: o.url, textContent: text, rel: "noopener"});
          td.appendChild(a);
        } else {
          td.textContent = text;
        }
        tr.appendChild(td);
      }
      rows.appendChild(tr);
    }
    if (!p.offers.length) card.querySelector(".compare").hidden = true;
    card.querySelector(".more").addEventListener("click", () => recommend(p));
    box.appendChild(card);
  }
}

// ------------------------------------------------------------------ wiring

for (const id of ["photo", "camera"]) {
  $(id).addEventListener("change", (ev) => {
    const file = ev.target.files[0];
    if (file) searchPhoto(file);
  });
}

const drop = $("drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (ev) => { ev.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, (ev) => { ev.preventDefault(); drop.classList.remove("over"); });
}
drop.addEventListener("drop", (ev) => {
  const file = ev.dataTransfer.files[0];
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) { showError("That is not a photo (" + file.type + ")."); return; }
  searchPhoto(file);
});

$("filters").addEventListener("submit", (ev) => { ev.preventDefault(); rerun(); });
$("filters").addEventListener("reset", () => setTimeout(rerun, 0));
