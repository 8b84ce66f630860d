"use strict";
// Everything shown here comes from the appliance's API through this box's local server.
const $ = (id) => document.getElementById(id);
const token = new URLSearchParams(location.search).get("token");
const headers = token ? { "X-Pairing-Token": token, "Content-Type": "application/json" } : { "Content-Type": "application/json" };

async function api(path, options = {}) {
  const r = await fetch(path, { headers, ...options });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

function profileId() { return $("profile").value; }

async function loadProfiles(selected) {
  const data = await api("/api/profiles");
  const select = $("profile");
  select.replaceChildren();
  for (const p of data.profiles) {
    const opt = document.createElement("option");
    opt.value = p.profileId; opt.textContent = p.profileId;
    select.appendChild(opt);
  }
  $("no-profiles").hidden = data.profiles.length > 0;
  if (selected && data.profiles.some((p) => p.profileId === selected)) select.value = selected;
  await loadProfile();
}

async function loadProfile() {
  const id = profileId();
  if (!id) { clearProfile(); return; }
  try {
    const ex = await api(`/api/profiles/${encodeURIComponent(id)}`);
    $("consent").checked = ex.cameraAffect;
    $("consent-state").textContent = ex.cameraAffect ? "Camera mood is on for this profile." : "Camera mood is off for this profile.";
    $("events").textContent = ex.eventsStored;
    $("sessions").textContent = ex.sessionsStored;
    $("oldest").textContent = Number(ex.oldestEventUnixMs) ? new Date(Number(ex.oldestEventUnixMs)).toLocaleString() : "none";
    $("genres").textContent = ex.topGenres.map((g) => g.genre).join(", ") || "none yet";
    $("statements").replaceChildren(...ex.statements.map((s) => { const li = document.createElement("li"); li.textContent = s; return li; }));
    $("why").replaceChildren(...ex.topItems.map((it) => {
      const li = document.createElement("li");
      const title = document.createElement("strong"); title.textContent = it.title;
      const why = document.createElement("div"); why.className = "reasons";
      why.textContent = it.reasons.map((r) => r.text).join("; ");
      li.append(title, why);
      return li;
    }));
  } catch (e) {
    clearProfile();
    $("delete-state").textContent = e.message;
  }
}

function clearProfile() {
  for (const id of ["events", "sessions", "oldest", "genres"]) $(id).textContent = "–";
  $("statements").replaceChildren(); $("why").replaceChildren(); $("consent").checked = false;
}

async function pollStatus() {
  try {
    const st = await api("/api/status");
    const ind = $("camera-indicator");
    ind.textContent = st.camera_open ? "Camera is on" : "Camera is off";
    ind.className = "indicator " + (st.camera_open ? "on" : "off");
  } catch (e) { /* keep the last state; the next poll retries */ }
}

$("profile").addEventListener("change", loadProfile);
$("consent").addEventListener("change", async (ev) => {
  const wanted = ev.target.checked;
  try {
    const st = await api(`/api/profiles/${encodeURIComponent(profileId())}/consent`,
                         { method: "POST", body: JSON.stringify({ camera_affect: wanted }) });
    $("consent-state").textContent = st.camera_affect ? "Camera mood is on for this profile." : "Camera mood is off for this profile.";
  } catch (e) { ev.target.checked = !wanted; $("consent-state").textContent = e.message; }
  pollStatus();
});
$("delete").addEventListener("click", () => { $("confirm-box").hidden = false; $("confirm-delete").focus(); });
$("cancel-delete").addEventListener("click", () => { $("confirm-box").hidden = true; $("delete").focus(); });
$("confirm-delete").addEventListener("click", async () => {
  try {
    const out = await api(`/api/profiles/${encodeURIComponent(profileId())}/forget`, { method: "POST" });
    $("delete-state").textContent = `Deleted ${out.eventsDeleted} events and ${out.sessionsDeleted} sessions.`;
  } catch (e) { $("delete-state").textContent = e.message; }
  $("confirm-box").hidden = true;
  await loadProfiles();
});

loadProfiles(new URLSearchParams(location.search).get("profile"));
pollStatus();
setInterval(pollStatus, 1000);
