-- The header of a row entry (keys.row_header writes it): "kind|gen|row id|version|expiry|"
-- + MAC + body. For "no such row" (N) the row id is empty and the version is the write
-- count it was stored under. The only place Lua parses it.
local function header(v)
  return string.match(v, '^(%u)|([^|]*)|([^|]*)|([^|]*)|')
end
-- Whether value v is valid for generation g and write count w: a row while its row
-- version stands, a "no such row" while the model saw no write since it was stored.
local function valid(v, g, w, rowprefix)
  local kind, vg, rid, ver = header(v)
  if vg ~= g then return false end
  if kind == 'N' then return ver == w end
  if kind == 'P' then return sget(rowprefix .. rid) == ver end
  return false
end
