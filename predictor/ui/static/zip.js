// A ZIP archive of small files, written in plain JavaScript: stored entries (no compression,
// which captions do not need), CRC-32 computed here, UTF-8 names. No ZIP64: at most 65535
// entries and 4 GiB, far beyond a folder of captions.
"use strict";

(() => {
  const CRC_TABLE = (() => {
    const table = new Uint32Array(256);
    for (let n = 0; n < 256; n++) {
      let c = n;
      for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
      table[n] = c >>> 0;
    }
    return table;
  })();

  /** CRC-32 (ISO-HDLC, the one ZIP and PNG use) of a Uint8Array. */
  function crc32(bytes) {
    let crc = 0xffffffff;
    for (let i = 0; i < bytes.length; i++) crc = CRC_TABLE[(crc ^ bytes[i]) & 0xff] ^ (crc >>> 8);
    return (crc ^ 0xffffffff) >>> 0;
  }

  function dosTime(date) {
    const time = (date.getHours() << 11) | (date.getMinutes() << 5) | (date.getSeconds() >> 1);
    const year = Math.max(date.getFullYear(), 1980) - 1980;
    return { time, date: (year << 9) | ((date.getMonth() + 1) << 5) | date.getDate() };
  }

  const UTF8_NAMES = 0x0800; // general purpose flag bit 11: names are UTF-8
  const VERSION = 20; // 2.0: what readers need for folders in names

  /** A Blob holding a ZIP of `entries`: [{name: "a/b.txt", data: Uint8Array}]. */
  function buildZip(entries, now = new Date()) {
    if (entries.length > 0xffff) throw new Error("more than 65535 files: too many for one ZIP");
    const encoder = new TextEncoder();
    const stamp = dosTime(now);
    const parts = [];
    const central = [];
    let offset = 0;
    for (const entry of entries) {
      const name = encoder.encode(entry.name);
      const crc = crc32(entry.data);
      const size = entry.data.length;
      const local = new DataView(new ArrayBuffer(30));
      local.setUint32(0, 0x04034b50, true);
      local.setUint16(4, VERSION, true);
      local.setUint16(6, UTF8_NAMES, true);
      local.setUint16(8, 0, true); // stored
      local.setUint16(10, stamp.time, true);
      local.setUint16(12, stamp.date, true);
      local.setUint32(14, crc, true);
      local.setUint32(18, size, true);
      local.setUint32(22, size, true);
      local.setUint16(26, name.length, true);
      local.setUint16(28, 0, true);
      parts.push(local, name, entry.data);

      const header = new DataView(new ArrayBuffer(46));
      header.setUint32(0, 0x02014b50, true);
      header.setUint16(4, VERSION, true);
      header.setUint16(6, VERSION, true);
      header.setUint16(8, UTF8_NAMES, true);
      header.setUint16(10, 0, true);
      header.setUint16(12, stamp.time, true);
      header.setUint16(14, stamp.date, true);
      header.setUint32(16, crc, true);
      header.setUint32(20, size, true);
      header.setUint32(24, size, true);
      header.setUint16(28, name.length, true);
      // extra length, comment length, disk number, internal and external attributes: 0
      header.setUint32(42, offset, true);
      central.push(header, name);
      offset += 30 + name.length + size;
    }
    const centralSize = central.reduce((sum, part) => sum + part.byteLength, 0);
    const end = new DataView(new ArrayBuffer(22));
    end.setUint32(0, 0x06054b50, true);
    end.setUint16(8, entries.length, true);
    end.setUint16(10, entries.length, true);
    end.setUint32(12, centralSize, true);
    end.setUint32(16, offset, true);
    return new Blob([...parts, ...central, end], { type: "application/zip" });
  }

  window.StoredZip = { crc32, buildZip };
})();
