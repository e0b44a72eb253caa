//! Property-based tests: key derivation and config parsing hold their rules for any input.

use std::path::Path;

use audience_sync::audience::{MAX_KEY_LEN, derive_key, validate_key};
use audience_sync::config::{Config, EnvOverrides};
use proptest::prelude::*;

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, Path::new("test.toml"), &EnvOverrides::default()).map_err(|e| e.to_string())
}

fn is_snake(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= MAX_KEY_LEN
        && key.split('_').all(|w| {
            !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        })
}

/// Lowercase words, each shown in one of three cases.
fn words() -> impl Strategy<Value = Vec<(String, u8)>> {
    prop::collection::vec(("[a-z]{1,8}", 0u8..3), 1..6)
}

fn show(words: &[(String, u8)], sep: &str) -> String {
    words
        .iter()
        .map(|(w, case)| match case {
            0 => w.clone(),
            1 => w.to_uppercase(),
            _ => {
                let mut c = w.chars();
                let first = c.next().unwrap().to_ascii_uppercase();
                format!("{first}{}", c.as_str())
            }
        })
        .collect::<Vec<_>>()
        .join(sep)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_name_gives_a_valid_key_or_an_error(name in "\\PC{0,40}") {
        if let Ok(key) = derive_key(&name) {
            prop_assert!(is_snake(&key), "{name:?} -> {key:?}");
            prop_assert!(validate_key(&key).is_ok());
            // Deriving again from the key changes nothing.
            prop_assert_eq!(derive_key(&key).unwrap(), key);
        }
    }

    #[test]
    fn case_spacing_and_punctuation_do_not_change_the_key(
        w in words(),
        sep in prop::sample::select(vec![" ", "_", "-", "  ", " - ", ". ", "/"]),
    ) {
        let expected: Vec<String> = w.iter().map(|(word, _)| word.clone()).collect();
        let expected = expected.join("_");
        prop_assert_eq!(derive_key(&show(&w, sep)).unwrap(), expected.clone());
        prop_assert_eq!(derive_key(&show(&w, " ")).unwrap(), expected);
    }

    #[test]
    fn long_names_give_a_short_valid_key_or_an_error(name in "[A-Za-z0-9 _.-]{100,300}") {
        match derive_key(&name) {
            Ok(key) => {
                prop_assert!(is_snake(&key), "{name:?} -> {key:?}");
                prop_assert_eq!(derive_key(&key).unwrap(), key);
            }
            Err(e) => prop_assert!(e.contains("longer than 128") || e.contains("no letters"), "{e}"),
        }
    }

    #[test]
    fn names_without_ascii_letters_or_digits_are_refused(
        name in "[ _.,;:!?()\\[\\]{}'\"/\\\\🎉😀✨–—·]{0,30}",
    ) {
        let err = derive_key(&name).unwrap_err();
        prop_assert!(err.contains("no key can be derived"), "{name:?}: {err}");
    }

    #[test]
    fn validate_key_accepts_exactly_snake_case(key in "[a-z0-9_]{0,20}|\\PC{0,10}") {
        prop_assert_eq!(validate_key(&key).is_ok(), is_snake(&key));
    }

    #[test]
    fn arbitrary_text_never_panics_the_parser(text in "\\PC{0,200}") {
        let _ = parse(&text);
    }

    #[test]
    fn generated_configs_round_trip(
        w in words(),
        schedule in prop::sample::select(vec!["0 0 */3 * * *", "*/15 * * * *", "0 30 2 * * Mon"]),
        concurrency in 1usize..64,
        enabled in any::<bool>(),
    ) {
        let name = show(&w, " ");
        let text = format!(
            "[database]\nurl = \"postgres://localhost/x\"\n[wigzo]\nconcurrency = {concurrency}\n\
             [[audience]]\nname = \"{name}\"\nschedule = \"{schedule}\"\nenabled = {enabled}\n\
             query = \"SELECT id AS user_id FROM users\"\n"
        );
        let cfg = parse(&text).unwrap();
        prop_assert_eq!(cfg.wigzo.concurrency, concurrency);
        let a = &cfg.audiences[0];
        prop_assert_eq!(&a.name, &name);
        prop_assert_eq!(&a.key, &derive_key(&name).unwrap());
        prop_assert_eq!(&a.schedule, schedule);
        prop_assert_eq!(a.enabled, enabled);
    }

    #[test]
    fn unknown_fields_are_refused_by_name(
        field in "x[a-z_]{2,12}",
        section in prop::sample::select(vec!["[database]", "[wigzo]", "[ops]", "[daemon]", "[[audience]]\nname = \"A\"\nquery = \"SELECT 1 AS user_id\""]),
    ) {
        let text = format!("{section}\n{field} = 1\n");
        let err = parse(&text).unwrap_err();
        prop_assert!(err.contains(&field), "{err}");
    }

    #[test]
    fn the_token_never_appears_in_an_error(
        token in "[A-Za-z0-9]{12,32}",
        breakage in prop::sample::select(vec![
            "org_token = TOKEN",                      // not a string: the line is quoted back
            "org_token = \"TOKEN\"\nconcurrency = 0", // a valid token, another bad setting
            "org_token = \"TOKEN\"\nbogus = 1",       // unknown field next to it
            "org_token = \"TOKEN",                    // unterminated string
            "org_token = [\"TOKEN\"]",                // wrong type
        ]),
    ) {
        let text = format!("[wigzo]\n{}\n", breakage.replace("TOKEN", &token));
        let err = parse(&text).unwrap_err();
        prop_assert!(!err.contains(&token), "token leaked: {err}");
    }

    #[test]
    fn a_secret_value_never_appears_in_a_config_error(
        secret in "[A-Za-z0-9+/=_-]{12,40}",
        key in "[a-z][a-z_]{0,14}",
        shape in 0usize..9,
        breakage in prop::sample::select(vec![
            "concurrency = \"x\"",
            "bogus = 1",
            "",
            "concurrency = 0",
            "[oops",
            "x = ",
        ]),
    ) {
        let v = &secret;
        let text = match shape {
            0 => format!("[wigzo]\n{key} = \"{v}\"\n{breakage}\n"),
            1 => format!("wigzo = {{ {key} = \"{v}\", concurrency = \"x\" }}\n"),
            2 => format!("wigzo.{key} = \"{v}\"\n{breakage}\n"),
            3 => format!("[wigzo]\n{key} = '{v}'\n{breakage}\n"),
            4 => format!("[wigzo]\n{key} = [\"{v}\", 1]\n{breakage}\n"),
            5 => format!("[wigzo]\n{key} = {v}\n"),
            6 => format!("[ops]\n{key} = \"\"\"\n{v}\n\"\"\"\n{breakage}\n"),
            7 => format!("[database]\n{key} = {{ url = \"{v}\" }}\n{breakage}\n"),
            // Under an audience, any setting but its name (which errors name it by).
            _ => format!(
                "[[audience]]\nname = \"A\"\nquery = \"SELECT 1 AS user_id\"\n{} = \"{v}\"\n{breakage}\n",
                if key == "name" { "nam" } else { key.as_str() }
            ),
        };
        if let Err(err) = parse(&text) {
            prop_assert!(!err.contains(v.as_str()), "secret leaked for {text:?}: {err}");
        }
    }
}
