//! A MiniJinja environment that renders Hugging Face chat templates as transformers'
//! `apply_chat_template` does: Jinja2's `trim_blocks` and `lstrip_blocks`, loop controls, Python's
//! string and dict methods (`startswith`, `split`, `strip`, `items`, ... through
//! minijinja-contrib's pycompat), `raise_exception`, `strftime_now`, and `tojson` written as
//! Python's `json.dumps(x, ensure_ascii=False)` writes it (`", "` and `": "` separators, keys in
//! their given order, `indent=` for pretty output), not MiniJinja's HTML-safe compact JSON.

use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{Environment, Error, ErrorKind};

/// The environment, holding one template named `chat` compiled from `source`.
pub fn environment(source: String) -> Result<Environment<'static>, Error> {
    let mut env = Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.set_keep_trailing_newline(false);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_filter("tojson", tojson);
    env.add_function("raise_exception", raise_exception);
    env.add_function("strftime_now", strftime_now);
    env.add_template_owned("chat", source)?;
    Ok(env)
}

/// transformers' `raise_exception(message)`: the render fails with the template's message.
fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, format!("the template raised: {message}")))
}

/// transformers' `strftime_now(format)`: the local date and time (templates print today's date).
fn strftime_now(format: String) -> Result<Value, Error> {
    Ok(Value::from(chrono::Local::now().format(&format).to_string()))
}

/// `json.dumps(value, ensure_ascii=False, indent=indent, sort_keys=sort_keys)`.
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    dump(&value, indent, sort_keys.unwrap_or(false), 0, &mut out)?;
    Ok(Value::from(out))
}

fn dump(value: &Value, indent: Option<usize>, sort: bool, depth: usize, out: &mut String) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.extend(std::iter::repeat_n(' ', n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number => out.push_str(&number(value)),
        ValueKind::String => string(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq | ValueKind::Iterable | ValueKind::Map => {
            let map = value.kind() == ValueKind::Map;
            let mut items: Vec<Value> = value.try_iter()?.collect();
            if map && sort {
                items.sort();
            }
            let (open, close) = if map { ('{', '}') } else { ('[', ']') };
            out.push(open);
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                if map {
                    match item.as_str() {
                        Some(k) => string(k, out),
                        None => string(&item.to_string(), out),
                    }
                    out.push_str(": ");
                    dump(&value.get_item(item)?, indent, sort, depth + 1, out)?;
                } else {
                    dump(item, indent, sort, depth + 1, out)?;
                }
            }
            if !items.is_empty() {
                newline(out, depth);
            }
            out.push(close);
        }
        other => return Err(Error::new(ErrorKind::InvalidOperation, format!("tojson cannot write a {other}"))),
    }
    Ok(())
}

/// A number as Python prints it in JSON: integers plainly, floats with `repr` (`1.0`, `0.5`).
fn number(value: &Value) -> String {
    if let Ok(i) = i64::try_from(value.clone()) {
        if !value.to_string().contains(['.', 'e', 'E']) {
            return i.to_string();
        }
    }
    match f64::try_from(value.clone()) {
        Ok(f) if f.is_finite() && f == f.trunc() && f.abs() < 1e16 => format!("{f:.1}"),
        Ok(f) if f.is_finite() => format!("{f:?}"),
        Ok(f) if f.is_nan() => "NaN".into(),
        Ok(f) => (if f > 0.0 { "Infinity" } else { "-Infinity" }).into(),
        Err(_) => value.to_string(),
    }
}

/// A JSON string with `ensure_ascii=False`: quotes, backslashes and control characters escaped,
/// everything else as is.
fn string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, ctx: Value) -> String {
        environment(source.to_string()).unwrap().get_template("chat").unwrap().render(ctx).unwrap()
    }

    #[test]
    fn tojson_writes_as_python_json_dumps() {
        let v: serde_json::Value = serde_json::from_str(r#"{"b": 1, "a": [1.5, 2.0, "x\"y", null, true], "名": "值\n"}"#).unwrap();
        let ctx = Value::from_serialize(serde_json::json!({ "v": v }));
        assert_eq!(render("{{ v | tojson }}", ctx.clone()), r#"{"b": 1, "a": [1.5, 2.0, "x\"y", null, true], "名": "值\n"}"#);
        assert_eq!(render("{{ v.a[:1] | tojson(indent=2) }}", ctx.clone()), "[\n  1.5\n]");
        assert_eq!(render("{{ {} | tojson(indent=4) }}|{{ [] | tojson }}", ctx), "{}|[]");
    }

    #[test]
    fn python_methods_loop_controls_and_raise_exception() {
        let ctx = Value::from_serialize(serde_json::json!({ "s": "<think>\nx\n</think>\n\ny" }));
        let src = "{{ s.split('</think>')[-1].lstrip('\\n') }}|{{ s.startswith('<think>') }}|\
                   {% for i in [1, 2, 3] %}{% if i == 2 %}{% break %}{% endif %}{{ i }}{% endfor %}";
        // Booleans print as Python prints them, as Jinja2 does.
        assert_eq!(render(src, ctx), "y|True|1");
        let env = environment("{{ raise_exception('no tools here') }}".into()).unwrap();
        let err = env.get_template("chat").unwrap().render(Value::UNDEFINED).unwrap_err();
        assert!(err.to_string().contains("the template raised: no tools here"), "{err}");
    }
}
