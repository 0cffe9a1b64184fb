//! Commit windows: when a prefetched version may be committed (`apply = "window"`).
//!
//! A window is written `DAYS HH:MM-HH:MM [ZONE]`:
//! - `DAYS`: a weekday (`Sat`), a range (`Mon-Fri`), a list (`Sat,Sun`), or `daily`;
//! - the times are on the day the window opens; an end at or before the start runs past
//!   midnight into the next day (`Fri 22:00-02:00`);
//! - `ZONE`: an IANA zone name (`Europe/Berlin`), or `UTC` (the default). Daylight-saving
//!   changes follow the zone: a window is in the zone's wall-clock time.
//!
//! `commit_window` is a list of them; a commit may happen when any one is open.

use jiff::civil::{Time, Weekday};
use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};

#[derive(Clone, Debug)]
pub struct Window {
    text: String,
    /// Days the window opens on, Monday = bit 0.
    days: u8,
    start: Time,
    end: Time,
    tz: TimeZone,
}

const DAYS: [(&str, Weekday); 7] = [
    ("mon", Weekday::Monday),
    ("tue", Weekday::Tuesday),
    ("wed", Weekday::Wednesday),
    ("thu", Weekday::Thursday),
    ("fri", Weekday::Friday),
    ("sat", Weekday::Saturday),
    ("sun", Weekday::Sunday),
];

fn day(s: &str) -> Option<usize> {
    let s = s.to_ascii_lowercase();
    DAYS.iter().position(|(n, _)| s == *n || (s.len() > 3 && n.starts_with(&s[..3]) && is_full_name(&s)))
}

fn is_full_name(s: &str) -> bool {
    ["monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday"].contains(&s)
}

fn bit(w: Weekday) -> u8 {
    1 << (w.to_monday_zero_offset() as u8)
}

fn time(s: &str) -> Option<Time> {
    let (h, m) = s.split_once(':')?;
    if h.is_empty() || h.len() > 2 || m.len() != 2 {
        return None;
    }
    let (h, m): (i8, i8) = (h.parse().ok()?, m.parse().ok()?);
    if h == 24 && m == 0 {
        return Some(Time::midnight());
    }
    Time::new(h, m, 0, 0).ok()
}

impl Window {
    /// Parses one window; the error says what is wrong and shows the form.
    pub fn parse(text: &str) -> Result<Window, String> {
        let bad = |why: String| {
            format!("{why} in {text:?} (expected DAYS HH:MM-HH:MM [ZONE], e.g. \"Sat 02:00-04:00\", \"Mon-Fri 22:00-02:00 Europe/Berlin\" or \"daily 03:00-04:00\")")
        };
        let parts: Vec<&str> = text.split_whitespace().collect();
        let (days_s, range, zone) = match parts.as_slice() {
            [d, r] => (*d, *r, None),
            [d, r, z] => (*d, *r, Some(*z)),
            _ => return Err(bad("not two or three words".into())),
        };
        let mut days = 0u8;
        if days_s.eq_ignore_ascii_case("daily") || days_s == "*" {
            days = 0x7f;
        } else {
            for item in days_s.split(',') {
                match item.split_once('-') {
                    Some((a, b)) => {
                        let (a, b) = (
                            day(a).ok_or_else(|| bad(format!("unknown weekday {a:?}")))?,
                            day(b).ok_or_else(|| bad(format!("unknown weekday {b:?}")))?,
                        );
                        let mut i = a;
                        loop {
                            days |= 1 << i;
                            if i == b {
                                break;
                            }
                            i = (i + 1) % 7;
                        }
                    }
                    None => days |= 1 << day(item).ok_or_else(|| bad(format!("unknown weekday {item:?}")))?,
                }
            }
        }
        let (a, b) = range.split_once('-').ok_or_else(|| bad(format!("no time range HH:MM-HH:MM in {range:?}")))?;
        let start = time(a).ok_or_else(|| bad(format!("bad time {a:?}")))?;
        let end = time(b).ok_or_else(|| bad(format!("bad time {b:?}")))?;
        // `00:00-24:00` is the whole day; any other range with its end at its start is empty.
        if start == end && !(b == "24:00" && start == Time::midnight()) {
            return Err(bad("an empty time range".into()));
        }
        let tz = match zone {
            None => TimeZone::UTC,
            Some(z) if z.eq_ignore_ascii_case("utc") => TimeZone::UTC,
            Some(z) => TimeZone::get(z).map_err(|e| bad(format!("unknown time zone {z:?}: {e}")))?,
        };
        Ok(Window { text: text.to_owned(), days, start, end, tz })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    fn crosses_midnight(&self) -> bool {
        self.end <= self.start
    }

    /// Whether the window is open at `now`.
    pub fn is_open(&self, now: Timestamp) -> bool {
        let z = now.to_zoned(self.tz.clone());
        let t = z.time();
        let today = self.days & bit(z.weekday()) != 0;
        if !self.crosses_midnight() {
            return today && t >= self.start && t < self.end;
        }
        let yesterday = self.days & bit(z.weekday().previous()) != 0;
        (today && t >= self.start) || (yesterday && t < self.end)
    }

    /// When the window next opens after `now` (or `now`, if it is open).
    pub fn next_open(&self, now: Timestamp) -> Timestamp {
        if self.is_open(now) {
            return now;
        }
        let z: Zoned = now.to_zoned(self.tz.clone());
        let mut best: Option<Timestamp> = None;
        for d in 0..8i64 {
            let Ok(date) = z.date().checked_add(d.days()) else { continue };
            if self.days & bit(date.weekday()) == 0 {
                continue;
            }
            let Ok(at) = date.to_datetime(self.start).to_zoned(self.tz.clone()) else { continue };
            let ts = at.timestamp();
            if ts > now && best.is_none_or(|b| ts < b) {
                best = Some(ts);
            }
        }
        best.unwrap_or(now)
    }
}

/// The windows of `commit_window`, each checked; the error names the key.
pub fn parse_all(texts: &[String]) -> Result<Vec<Window>, String> {
    if texts.is_empty() {
        return Err("apply = \"window\" needs at least one window, e.g. [\"Sat 02:00-04:00\"]".into());
    }
    texts.iter().map(|t| Window::parse(t)).collect()
}

/// Whether any window is open at `now`.
pub fn any_open(ws: &[Window], now: Timestamp) -> bool {
    ws.iter().any(|w| w.is_open(now))
}

/// When the first window next opens.
pub fn next_open(ws: &[Window], now: Timestamp) -> Option<Timestamp> {
    ws.iter().map(|w| w.next_open(now)).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn a_weekly_window_is_open_only_in_its_hours() {
        let w = Window::parse("Sat 02:00-04:00").unwrap();
        // 2026-12-05 is a Saturday.
        assert!(w.is_open(ts("2026-12-05T02:00:00Z")));
        assert!(w.is_open(ts("2026-12-05T03:59:59Z")));
        assert!(!w.is_open(ts("2026-12-05T04:00:00Z")));
        assert!(!w.is_open(ts("2026-12-06T03:00:00Z")));
        assert_eq!(w.next_open(ts("2026-12-05T05:00:00Z")), ts("2026-12-12T02:00:00Z"));
        assert_eq!(w.next_open(ts("2026-12-04T23:00:00Z")), ts("2026-12-05T02:00:00Z"));
    }

    #[test]
    fn a_window_past_midnight_and_a_named_zone() {
        let w = Window::parse("Fri 22:00-02:00 Europe/Berlin").unwrap();
        // Berlin is UTC+1 in December: Fri 22:00 there is 21:00 UTC.
        assert!(w.is_open(ts("2026-12-04T21:00:00Z")));
        assert!(w.is_open(ts("2026-12-05T00:59:00Z")));
        assert!(!w.is_open(ts("2026-12-05T01:00:00Z")));
        assert!(!w.is_open(ts("2026-12-04T20:59:00Z")));
        let d = Window::parse("Mon-Fri,Sun 01:00-02:00").unwrap();
        assert!(d.is_open(ts("2026-12-06T01:30:00Z")), "Sunday");
        assert!(!d.is_open(ts("2026-12-05T01:30:00Z")), "not Saturday");
        assert!(Window::parse("daily 03:00-04:00").unwrap().is_open(ts("2026-12-05T03:10:00Z")));
        let all = Window::parse("daily 00:00-24:00").unwrap();
        assert!(all.is_open(ts("2026-12-05T00:00:00Z")) && all.is_open(ts("2026-12-05T23:59:59Z")));
    }

    #[test]
    fn bad_windows_are_refused_with_the_key_and_the_form() {
        for (text, want) in [
            ("Sat", "not two or three words"),
            ("Sam 02:00-04:00", "unknown weekday \"Sam\""),
            ("Sat 2-4", "bad time \"2\""),
            ("Sat 25:00-04:00", "bad time \"25:00\""),
            ("Sat 02:00-02:00", "an empty time range"),
            ("Sat 02:00-04:00 Mars/Olympus", "unknown time zone \"Mars/Olympus\""),
        ] {
            let e = parse_all(&[text.to_owned()]).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.contains("expected DAYS HH:MM-HH:MM [ZONE]"), "{e}");
        }
        assert!(parse_all(&[]).unwrap_err().contains("needs at least one window"));
    }
}
