"""The operator page of ``ddad serve`` (GET /): pick or drop images, see each decision, the score against the
threshold and the heatmap over the image with its colour scale, and the last decisions. One HTML file with
its script and style inline: nothing is fetched from elsewhere, so it works offline on the line."""

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>ddad inspection</title>
<style>
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
#drop{border:2px dashed #888;padding:1.5em;text-align:center;border-radius:8px}
#drop.over{background:#eef}
.result{display:flex;gap:1.5em;margin:1em 0;align-items:flex-start}
.view{position:relative}
.view img,.view canvas{display:block;width:320px;image-rendering:pixelated}
.view canvas{position:absolute;left:0;top:0;opacity:.55}
.defective{color:#b00;font-weight:bold}.good{color:#070;font-weight:bold}
.bar{width:240px;height:12px;background:linear-gradient(90deg,#000,#f00,#ff0,#fff)}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px}
</style></head><body>
<h1>ddad inspection</h1>
<p id="model">loading model information ...</p>
<div id="drop">Drop images here, or <input type="file" id="pick" accept="image/*" multiple></div>
<div id="results"></div>
<h2>Last decisions</h2>
<table><thead><tr><th>time</th><th>image</th><th>decision</th><th>pred_score</th><th>score</th><th>threshold</th></tr></thead>
<tbody id="history"></tbody></table>
<script>
const HISTORY = 20;
const headers = {};
const token = new URLSearchParams(location.hash.slice(1)).get('token');
if (token) headers['Authorization'] = 'Bearer ' + token;
fetch('/v1/model', {headers}).then(r => r.json()).then(m => {
  document.getElementById('model').textContent = `model: ${m.method} (${m.source}), calibration key ${m.calibration_key}` +
    (m.decisions ? `, threshold ${m.decisions.threshold}` : ', no decisions stored');
});
function colour(v) {  // black - red - yellow - white, as the bar
  const t = v / 255 * 3;
  return [Math.min(255, t * 255), Math.max(0, Math.min(255, (t - 1) * 255)), Math.max(0, Math.min(255, (t - 2) * 255))];
}
function overlay(canvas, png, width, height) {
  const img = new Image();
  img.onload = () => {
    canvas.width = width; canvas.height = height;
    const ctx = canvas.getContext('2d');
    ctx.drawImage(img, 0, 0, width, height);
    const data = ctx.getImageData(0, 0, width, height);
    for (let i = 0; i < data.data.length; i += 4) {
      const [r, g, b] = colour(data.data[i]);
      data.data[i] = r; data.data[i + 1] = g; data.data[i + 2] = b; data.data[i + 3] = 255;
    }
    ctx.putImageData(data, 0, 0);
  };
  img.src = 'data:image/png;base64,' + png;
}
function show(file, r) {
  const box = document.createElement('div'); box.className = 'result';
  const view = document.createElement('div'); view.className = 'view';
  const photo = document.createElement('img'); photo.src = URL.createObjectURL(file);
  const heat = document.createElement('canvas'); heat.className = 'heatmap';
  photo.onload = () => overlay(heat, r.anomaly_map_png, photo.naturalWidth, photo.naturalHeight);
  view.append(photo, heat);
  const text = document.createElement('div');
  const decision = r.decision || 'no decision (no threshold stored)';
  text.innerHTML = `<div class="decision ${r.decision || ''}">${decision}</div>` +
    `<div>pred_score ${r.pred_score === null ? '-' : r.pred_score.toFixed(3)} (0.5 at the threshold)</div>` +
    `<div>score ${r.score.toPrecision(5)} against threshold ${r.threshold === null ? '-' : r.threshold.toPrecision(5)}</div>` +
    `<div>category ${r.category || '-'}; ${r.timings_ms.total} ms</div>` +
    `<div>heatmap 0 <span class="bar" style="display:inline-block"></span> ${r.anomaly_map_range[1].toPrecision(3)}</div>`;
  box.append(view, text);
  document.getElementById('results').prepend(box);
  const row = document.createElement('tr');
  row.innerHTML = `<td>${new Date().toLocaleTimeString()}</td><td>${file.name}</td><td class="${r.decision || ''}">${decision}</td>` +
    `<td>${r.pred_score === null ? '-' : r.pred_score.toFixed(3)}</td><td>${r.score.toPrecision(5)}</td><td>${r.threshold === null ? '-' : r.threshold.toPrecision(5)}</td>`;
  const history = document.getElementById('history');
  history.prepend(row);
  while (history.children.length > HISTORY) history.lastChild.remove();
}
async function send(files) {
  for (const file of files) {
    const form = new FormData(); form.append('image', file, file.name);
    const response = await fetch('/v1/predict?maps=1', {method: 'POST', body: form, headers});
    const body = await response.json();
    if (!response.ok) { alert(`${file.name}: ${body.error}`); continue; }
    show(file, body.results[0]);
  }
}
document.getElementById('pick').onchange = e => send(e.target.files);
const drop = document.getElementById('drop');
drop.ondragover = e => { e.preventDefault(); drop.classList.add('over'); };
drop.ondragleave = () => drop.classList.remove('over');
drop.ondrop = e => { e.preventDefault(); drop.classList.remove('over'); send(e.dataTransfer.files); };
</script></body></html>
"""
