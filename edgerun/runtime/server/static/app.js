// The kiosk page: everything it loads comes from this server (the CSP forbids anything else).
"use strict";

const $ = (id) => document.getElementById(id);
let current = null; // the chosen image, a Blob
let stream = null; // the camera's MediaStream while it is open
let served = [];

function headers() {
  const token = localStorage.getItem("edgerun-token") || "";
  return token ? { Authorization: "Bearer " + token } : {};
}

function say(message) {
  $("status").textContent = message || "";
}

async function call(path, body) {
  const isForm = body instanceof FormData;
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers: isForm || body === undefined ? headers() : { ...headers(), "Content-Type": "application/json" },
    body: body === undefined ? undefined : isForm ? body : JSON.stringify(body),
  });
  const data = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) {
    const retry = response.headers.get("Retry-After");
    throw new Error((data.error || response.statusText) + (retry ? " (retry in " + retry + " s)" : ""));
  }
  return data;
}

async function loadModels() {
  try {
    const info = await call("/v1/models");
    served = Object.keys(info.routes);
    const index = info.index ? "; gallery of " + info.index.count : "";
    $("models").textContent = "serving " + served.join(", ") + index;
    $("caption-section").classList.toggle("off", !served.includes("caption"));
    $("vqa-section").classList.toggle("off", !served.includes("vqa"));
    $("search-section").classList.toggle("off", !(served.includes("retrieval") && info.index));
  } catch (err) {
    $("models").textContent = "";
    say(err.message);
  }
}

function withImage(fields) {
  const form = new FormData();
  form.append("image", current, "image.jpg");
  for (const [name, value] of Object.entries(fields)) form.append(name, value);
  return form;
}

async function useImage(blob) {
  current = blob;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(blob);
  preview.hidden = false;
  $("answer").textContent = "";
  say("");
  if (!served.includes("caption")) return;
  $("caption").textContent = "…";
  try {
    $("caption").textContent = (await call("/v1/caption", withImage({}))).text;
  } catch (err) {
    $("caption").textContent = "";
    say(err.message);
  }
}

async function ask(event) {
  event.preventDefault();
  const question = $("question").value.trim();
  if (!current) return say("choose an image first");
  if (!question) return say("type a question first");
  $("answer").textContent = "…";
  try {
    $("answer").textContent = (await call("/v1/vqa", withImage({ question }))).text;
    say("");
  } catch (err) {
    $("answer").textContent = "";
    say(err.message);
  }
}

function showResults(results) {
  const box = $("results");
  box.replaceChildren();
  for (const hit of results) {
    const figure = document.createElement("figure");
    if (hit.thumbnail) {
      const img = document.createElement("img");
      img.src = hit.thumbnail;
      img.alt = hit.name;
      figure.append(img);
    } else {
      const none = document.createElement("div");
      none.className = "nothumb";
      none.textContent = "no thumbnail";
      figure.append(none);
    }
    const label = document.createElement("figcaption");
    label.textContent = hit.name + " · " + hit.score.toFixed(3);
    figure.append(label);
    box.append(figure);
  }
  if (!results.length) box.textContent = "nothing found";
}

async function search(event, byImage) {
  if (event) event.preventDefault();
  try {
    let body;
    if (byImage) {
      if (!current) return say("choose an image first");
      body = withImage({ k: 12 });
    } else {
      const text = $("search-text").value.trim();
      if (!text) return say("type what to look for first");
      body = { text, k: 12 };
    }
    showResults((await call("/v1/search", body)).results);
    say("");
  } catch (err) {
    say(err.message);
  }
}

async function startCamera() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    return say("this browser offers no camera here (it needs localhost or https)");
  }
  try {
    stream = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
  } catch (err) {
    return say("the camera could not be opened: " + err.message);
  }
  $("video").srcObject = stream;
  $("camera").hidden = false;
}

function stopCamera() {
  if (stream) stream.getTracks().forEach((track) => track.stop());
  stream = null;
  $("video").srcObject = null;
  $("camera").hidden = true;
}

function capture() {
  const video = $("video");
  if (!video.videoWidth) return say("the camera is not ready yet");
  const canvas = document.createElement("canvas");
  canvas.width = video.videoWidth;
  canvas.height = video.videoHeight;
  canvas.getContext("2d").drawImage(video, 0, 0);
  canvas.toBlob((blob) => { stopCamera(); useImage(blob); }, "image/jpeg", 0.9);
}

function setUp() {
  const token = $("token");
  token.value = localStorage.getItem("edgerun-token") || "";
  token.addEventListener("change", () => { localStorage.setItem("edgerun-token", token.value); loadModels(); });
  $("file").addEventListener("change", (e) => { if (e.target.files[0]) useImage(e.target.files[0]); });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const file = e.dataTransfer.files[0];
    if (file) useImage(file);
  });
  $("camera-start").addEventListener("click", startCamera);
  $("camera-stop").addEventListener("click", stopCamera);
  $("camera-capture").addEventListener("click", capture);
  $("ask-form").addEventListener("submit", ask);
  $("search-form").addEventListener("submit", (e) => search(e, false));
  $("search-image").addEventListener("click", () => search(null, true));
  loadModels();
}

document.addEventListener("DOMContentLoaded", setUp);
