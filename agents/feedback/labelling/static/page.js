"use strict";
const annotator = (new URLSearchParams(location.search).get("annotator") || "anonymous").trim() || "anonymous";
const MIN_SIDE = 240;  // small clips are scaled up on screen so a person can judge them
const KEYS = {ArrowLeft: "left", ArrowRight: "right", ArrowUp: "equal", ArrowDown: "skip"};
const CHOICE_TEXT = {left: "left preferred", right: "right preferred", equal: "equally good", skip: "dropped"};
let current = null;   // the pair on screen: its JSON from /api/next
let images = null;    // [left strip, right strip]
let frame = 0, timer = null, busy = false, pollTimer = null;

document.getElementById("annotator").textContent = annotator;
document.title = "Label preferences (" + annotator + ")";

function setState(state) {
  document.body.dataset.state = state;
  document.body.dataset.pairId = current ? String(current.pair_id) : "";
  document.getElementById("pair-name").textContent = current ? "pair " + current.pair_id : "";
  const ready = state === "showing";
  for (const b of document.querySelectorAll("button[data-choice]")) b.disabled = !ready;
  document.getElementById("btn-undo").disabled = busy;
}

function say(text, isError) {
  const m = document.getElementById("message");
  m.textContent = text;
  m.className = isError ? "error" : "";
}

function showCounter(pending) {
  document.getElementById("counter").textContent = pending + (pending === 1 ? " pair" : " pairs") + " waiting";
}

async function api(method, url, body) {
  const options = {method, headers: {"Content-Type": "application/json"}};
  if (body !== undefined) options.body = JSON.stringify(body);
  const response = await fetch(url, options);
  const data = await response.json().catch(() => ({error: "bad response (" + response.status + ")"}));
  if (!response.ok) throw new Error(data.error || ("HTTP " + response.status));
  return data;
}

function loadImage(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("could not load " + url));
    img.src = url;
  });
}

function stopPlaying() { if (timer !== null) { clearInterval(timer); timer = null; } }

// One timer draws frame i of both clips, so the two play in sync; they loop.
function drawFrame() {
  const p = current;
  for (const [i, id] of [[0, "left"], [1, "right"]]) {
    const ctx = document.getElementById(id).getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(images[i], 0, frame * p.height, p.width, p.height, 0, 0, p.width, p.height);
  }
  frame = (frame + 1) % p.frames;
}

function showPair(p, imgs, fps) {
  current = p; images = imgs; frame = 0;
  const zoom = Math.max(1, MIN_SIDE / Math.min(p.width, p.height));
  for (const id of ["left", "right"]) {
    const c = document.getElementById(id);
    c.width = p.width; c.height = p.height;
    c.style.width = Math.round(p.width * zoom) + "px";
    c.style.height = Math.round(p.height * zoom) + "px";
    c.hidden = false;
  }
  document.getElementById("waiting").hidden = true;
  drawFrame();
  timer = setInterval(drawFrame, 1000 / fps);
  setState("showing");
}

function showWaiting() {
  current = null;
  for (const id of ["left", "right"]) document.getElementById(id).hidden = true;
  document.getElementById("waiting").hidden = false;
  setState("waiting");
  pollTimer = setTimeout(loadNext, 1000);
}

async function loadNext() {
  stopPlaying();
  clearTimeout(pollTimer);
  setState("loading");
  try {
    const next = await api("GET", "/api/next");
    showCounter(next.pending);
    if (!next.pair) { showWaiting(); return; }
    const imgs = await Promise.all([loadImage(next.pair.left_url), loadImage(next.pair.right_url)]);
    showPair(next.pair, imgs, next.fps);
  } catch (e) {
    say(e.message, true);
    current = null;
    setState("error");
    pollTimer = setTimeout(loadNext, 2000);
  }
}

async function answer(choice) {
  if (busy || !current || document.body.dataset.state !== "showing") return;
  busy = true;
  const id = current.pair_id;
  setState("saving");
  try {
    await api("POST", "/api/label", {pair_id: id, choice, annotator});
    say("Saved pair " + id + ": " + CHOICE_TEXT[choice] + ".", false);
  } catch (e) {
    say(e.message, true);
  }
  busy = false;
  await loadNext();
}

async function undo() {
  if (busy) return;
  busy = true;
  setState(document.body.dataset.state);
  try {
    const r = await api("POST", "/api/undo", {annotator});
    say("Undone: pair " + r.undone + " is back, answer it again.", false);
    busy = false;
    await loadNext();
  } catch (e) {
    say("Cannot undo: " + e.message, true);
    busy = false;
    setState(document.body.dataset.state);
  }
}

document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (KEYS[event.key]) { event.preventDefault(); answer(KEYS[event.key]); }
  else if (event.key === "u" || event.key === "U") { event.preventDefault(); undo(); }
});
for (const b of document.querySelectorAll("button[data-choice]")) {
  b.addEventListener("click", () => answer(b.dataset.choice));
}
document.getElementById("btn-undo").addEventListener("click", undo);
// Keep the counter fresh while a pair is on screen (the trainer keeps submitting).
setInterval(async () => {
  if (document.body.dataset.state !== "showing") return;
  try { showCounter((await api("GET", "/api/next")).pending); } catch (e) {}
}, 2000);
loadNext();
