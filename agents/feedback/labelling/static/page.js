"use strict";
// The labelling page. The server lends each open page its own pending pair (identified by PAGE_ID, random per page),
// so two tabs or two annotators never answer the same pair; the page renews that loan every HEARTBEAT_MS.
const annotator = (new URLSearchParams(location.search).get("annotator") || "anonymous").trim() || "anonymous";
const PAGE_ID = pageId();
const MIN_SIDE = 240;  // small clips are scaled up on screen at least this far, so a person can judge them
const CLIP_GAP = 32;   // #clips' gap in page.css
const HEARTBEAT_MS = 2000;
const KEYS = {ArrowLeft: "left", ArrowRight: "right", ArrowUp: "equal", ArrowDown: "skip"};
const CHOICE_TEXT = {left: "left preferred", right: "right preferred", equal: "equally good", skip: "dropped"};
// A reloaded page keeps its id (and so its pair); a new page, a duplicated tab included, takes a new one.
function pageId() {
  const navigation = performance.getEntriesByType("navigation")[0];
  let id = navigation && navigation.type === "reload" ? sessionStorage.getItem("labelling-page") : null;
  if (!id) id = Math.random().toString(36).slice(2) + Date.now().toString(36);
  sessionStorage.setItem("labelling-page", id);
  return id;
}

let current = null;   // the pair on screen: its JSON from /api/next
let images = null;    // [left strip, right strip]
let fps = 12, frame = 0, timer = null, busy = false, pollTimer = null;

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

function plural(n, word) { return n + " " + word + (n === 1 ? "" : "s"); }

// The counts every /api/next answer carries: pairs waiting (and how many other pages are showing), and how many
// this annotator has answered in this run.
function showCounts(next) {
  let text = plural(next.pending, "pair") + " waiting";
  if (next.elsewhere) text += " (" + next.elsewhere + " on other pages)";
  document.getElementById("counter").textContent = text;
  if (next.answered !== null && next.answered !== undefined) {
    document.getElementById("answered").textContent = "(" + next.answered + " answered)";
  }
}

function nextUrl(showing) {
  let url = "/api/next?page=" + encodeURIComponent(PAGE_ID) + "&annotator=" + encodeURIComponent(annotator);
  if (showing !== undefined) url += "&showing=" + showing;
  return url;
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

// The game's goal (what "better" means) and, for MinAtar, which colour is which object.
async function showGame() {
  try {
    const game = await api("GET", "/api/game");
    document.getElementById("game-name").textContent = game.game ? game.game + ":" : "Goal:";
    document.getElementById("goal-text").textContent = game.goal;
    document.getElementById("goal").hidden = false;
    const legend = document.getElementById("legend");
    for (const entry of game.legend) {
      const item = document.createElement("li");
      const swatch = document.createElement("span");
      swatch.className = "swatch";
      swatch.style.background = entry.colour;
      item.append(swatch, entry.name);
      legend.append(item);
    }
    legend.hidden = game.legend.length === 0;
    if (current) fitClips();
  } catch (e) {
    say("Could not load the game's description: " + e.message, true);
  }
}

// The clips take the window's width (half each), then shrink as far as keeps the page within the window's height
// (the buttons stay on screen), but not below MIN_SIDE.
function fitClips() {
  if (!current) return;
  const border = 6;  // 3px each side
  const setZoom = (zoom) => {
    zoom = Math.max(zoom, MIN_SIDE / Math.min(current.width, current.height));
    for (const id of ["left", "right"]) {
      const c = document.getElementById(id);
      c.style.width = Math.floor(current.width * zoom) + "px";
      c.style.height = Math.floor(current.height * zoom) + "px";
    }
    const both = 2 * (Math.floor(current.width * zoom) + border) + CLIP_GAP;
    document.getElementById("timeline").style.maxWidth = both + "px";
    return zoom;
  };
  const zoom = setZoom(((document.getElementById("clips").clientWidth - CLIP_GAP) / 2 - border) / current.width);
  const excess = document.documentElement.scrollHeight - window.innerHeight;  // what the page overflows by
  if (excess > 0) setZoom(zoom - excess / current.height);
}

function stopPlaying() { if (timer !== null) { clearInterval(timer); timer = null; } }

// One timer draws frame i of both clips, so the two play in sync; they loop. The first frames of each loop are
// framed in yellow and the timeline's marker jumps back to its start, so a restart is not mistaken for a teleport.
function drawFrame() {
  const p = current;
  for (const [i, id] of [[0, "left"], [1, "right"]]) {
    const canvas = document.getElementById(id);
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(images[i], 0, frame * p.height, p.width, p.height, 0, 0, p.width, p.height);
    canvas.classList.toggle("restart", frame < Math.max(2, Math.round(fps / 4)));
  }
  const playhead = document.getElementById("playhead");
  playhead.style.left = "calc(" + (p.frames > 1 ? frame / (p.frames - 1) : 0) * 100 + "% - 2px)";
  document.getElementById("frame-counter").textContent = "frame " + (frame + 1) + " / " + p.frames;
  if (frame === 0) document.body.dataset.restarts = String(Number(document.body.dataset.restarts) + 1);
  frame = (frame + 1) % p.frames;
}

function showPair(p, imgs) {
  current = p; images = imgs; frame = 0;
  for (const id of ["left", "right"]) {
    const c = document.getElementById(id);
    c.width = p.width; c.height = p.height;
    c.hidden = false;
  }
  document.getElementById("waiting").hidden = true;
  document.getElementById("timeline-row").hidden = false;
  drawFrame();  // first: the frame counter's text is part of the height fitClips fits
  fitClips();
  timer = setInterval(drawFrame, 1000 / fps);
  setState("showing");
}

function showWaiting(next) {
  current = null;
  for (const id of ["left", "right"]) document.getElementById(id).hidden = true;
  document.getElementById("timeline-row").hidden = true;
  const waiting = document.getElementById("waiting");
  waiting.textContent = next.pending
    ? "All " + plural(next.pending, "waiting pair") + " are open on other pages: this page checks again every second."
    : "No pairs waiting: this page checks again every second.";
  waiting.hidden = false;
  setState("waiting");
  pollTimer = setTimeout(loadNext, 1000);
}

async function loadNext() {
  stopPlaying();
  clearTimeout(pollTimer);
  setState("loading");
  try {
    const next = await api("GET", nextUrl());
    fps = next.fps;
    showCounts(next);
    if (!next.pair) { showWaiting(next); return; }
    const imgs = await Promise.all([loadImage(next.pair.left_url), loadImage(next.pair.right_url)]);
    showPair(next.pair, imgs);
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
    await api("POST", "/api/label", {pair_id: id, choice, annotator, page: PAGE_ID});
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
    const r = await api("POST", "/api/undo", {annotator, page: PAGE_ID});
    say("Undone: pair " + r.undone + " is back, answer it again.", false);
    busy = false;
    await loadNext();
  } catch (e) {
    say("Cannot undo: " + e.message, true);
    busy = false;
    setState(document.body.dataset.state);
  }
}

// While a pair is on screen: keep its loan, refresh the counts (the trainer keeps submitting), and move on if the
// pair is no longer this page's (another page answered it after this one's loan ran out, say).
async function heartbeat() {
  if (busy || document.body.dataset.state !== "showing" || !current) return;
  const shown = current.pair_id;
  try {
    const next = await api("GET", nextUrl(shown));
    if (busy || !current || current.pair_id !== shown) return;
    showCounts(next);
    if (!next.pair || next.pair.pair_id !== shown) await loadNext();
  } catch (e) {}
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
window.addEventListener("resize", fitClips);
// Closing or reloading the page gives its pair back at once, rather than after the server's lease runs out.
window.addEventListener("pagehide", () => {
  navigator.sendBeacon("/api/release", new Blob([JSON.stringify({page: PAGE_ID})], {type: "application/json"}));
});
setInterval(heartbeat, HEARTBEAT_MS);
showGame();
loadNext();
