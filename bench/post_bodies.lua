-- wrk script: POST the file named by $BENCH_BODY with content type $BENCH_CONTENT_TYPE.
-- With BENCH_LINES=1 each line of the file is one body and the bodies are sent in
-- turn (sentences of different lengths); otherwise the whole file is the body (an image).
local path = os.getenv("BENCH_BODY")
local file = assert(io.open(path, "rb"), "BENCH_BODY must name a readable file")
local data = file:read("*a")
file:close()
wrk.method = "POST"
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE") or "application/json"
if os.getenv("BENCH_LINES") == "1" then
  local bodies = {}
  for line in data:gmatch("[^\n]+") do
    bodies[#bodies + 1] = line
  end
  local i = 0
  request = function()
    i = i % #bodies + 1
    return wrk.format(nil, nil, nil, bodies[i])
  end
else
  wrk.body = data
end
